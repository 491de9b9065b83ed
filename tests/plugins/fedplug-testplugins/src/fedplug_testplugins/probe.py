"""A NumPy backend that records, for each process it runs in, which ML frameworks are imported there.

With ``FEDPLUG_PROBE_DIR`` set, every ``train`` and ``evaluate`` call writes
``<dir>/<pid>.json``: the frameworks in ``sys.modules`` of that process (the server's
simulation process and each Ray worker). Without it, it is the NumPy backend.
"""

import json
import os
import sys
from pathlib import Path

import fedplug
from fedplug.numpy_backend import NumpyBackend, NumpyImplementation

FRAMEWORKS = ("tensorflow", "keras", "torch", "jax", "mlx", "mxnet")


def record() -> None:
    folder = os.environ.get("FEDPLUG_PROBE_DIR")
    if folder:
        seen = sorted(name for name in FRAMEWORKS if name in sys.modules)
        Path(folder, f"{os.getpid()}.json").write_text(json.dumps(seen))


class ProbeImplementation(NumpyImplementation):
    def train(self, model, x, y, config):
        record()
        return super().train(model, x, y, config)

    def evaluate(self, model, x, y, config):
        record()
        return super().evaluate(model, x, y, config)


class ProbeBackend(NumpyBackend):
    name = "probe"
    description = "Test backend (NumPy) that records the frameworks imported where it runs"
    implementation = "fedplug_testplugins.probe:ProbeImplementation"


@fedplug.hookimpl
def fedplug_register_backends(register):
    register(ProbeBackend())
