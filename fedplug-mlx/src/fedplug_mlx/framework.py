"""Whether MLX can run on this machine, decided without importing it where possible.

The descriptor's ``Framework`` checks the platform and the ``mlx`` distribution; this
module adds what only MLX has, a compute library apart from its bindings. It imports no MLX
at import time (the descriptor imports it); ``nets`` and ``training`` import MLX directly.

MLX runs on Apple silicon Macs (Metal, wheel ``mlx`` + ``mlx-metal``) and on Linux
(CPU through ``mlx[cpu]``, NVIDIA GPUs through ``mlx[cuda12]``/``mlx[cuda13]``). The
``mlx`` wheel alone holds only the Python bindings; the compute library ``libmlx``
comes from one of those companion distributions.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path


def install_hint(system: str) -> str:
    """The pip command that installs a working MLX on ``system``."""
    if system == "Darwin":
        return "pip install --force-reinstall mlx"
    return "pip install 'mlx[cpu]' (or 'mlx[cuda12]' for an NVIDIA GPU)"


def has_native_library() -> bool:
    """Whether MLX's compute library is installed beside its bindings (or loads anyway)."""
    spec = importlib.util.find_spec("mlx")
    folders = (spec.submodule_search_locations or []) if spec else []
    if any(any((Path(folder) / "lib").glob("libmlx.*")) for folder in folders):
        return True
    try:  # other layouts, e.g. conda-forge's separate libmlx package
        importlib.import_module("mlx.core")
    except ImportError:
        return False
    return True
