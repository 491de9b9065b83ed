"""Make MXNet 1.9.1, the last release, import and run on numpy 1.26; import it quietly.

MXNet 1.9.1 (2022) still uses two numpy aliases that numpy 1.24 removed after
deprecating them in 1.20: ``np.bool`` (read at ``import mxnet`` by
``mxnet/numpy/utils.py``, and by boolean indexing and ``mxnet.test_utils``) and
``np.int`` (``mxnet.test_utils``). Both were plain aliases of the builtins.
``restore_numpy_aliases`` puts back exactly these two, as those builtins, only
where numpy lacks them; nothing else of numpy is touched. numpy 2 cannot run
MXNet at all (its compiled extension and API changed), so the descriptor's ``Framework``
requires ``numpy<2``.

Nothing here imports mxnet at module import time: the descriptor imports this module.
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType

import numpy as np

from fedplug.toolkit import cpu_share

MXNET_NUMPY_ALIASES: dict[str, type] = {"bool": bool, "int": int}
"""The removed numpy aliases that MXNet 1.9.1's Python code uses, and their values."""
INSTALL_HINT = 'pip install fedplug-mxnet "numpy<2" (in a virtual environment of its own)'


def restore_numpy_aliases() -> list[str]:
    """Set each alias of ``MXNET_NUMPY_ALIASES`` that numpy lacks; return the names set."""
    restored = []
    for name, value in MXNET_NUMPY_ALIASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy 1.26 warns when asked for a removed alias
            missing = not hasattr(np, name)
        if missing:
            setattr(np, name, value)
            restored.append(name)
    return restored


def import_mxnet() -> ModuleType:
    """Import mxnet with the aliases restored, its threads sized and its warnings hidden.

    MXNet runs operators with OpenMP; ``OMP_NUM_THREADS`` (if not set already, e.g. by
    Ray) is set to this process's CPU share. ``MXNET_CPU_WORKER_NTHREADS`` stays at its
    default of 1: one operator at a time, each using all those threads.
    """
    if "mxnet" not in sys.modules:
        os.environ.setdefault("OMP_NUM_THREADS", str(cpu_share()))
        restore_numpy_aliases()
    with warnings.catch_warnings():
        # distutils and removed-numpy-function DeprecationWarnings of mxnet's own code
        warnings.simplefilter("ignore")
        import mxnet
    module: ModuleType = mxnet
    return module
