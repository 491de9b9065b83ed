"""A NumPy backend that records, for each process it runs in, which ML frameworks are imported there.

With ``FEDPLUG_PROBE_DIR`` set, every ``train`` and ``evaluate`` call writes
``<dir>/<pid>.json`` about that process (the server's simulation process or a Ray worker):
``frameworks``, those in ``sys.modules``; ``worker``, whether it is a Ray worker; ``blas-threads``,
the threads of NumPy's BLAS (threadpoolctl). Without it, it is the NumPy backend.
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
        from threadpoolctl import threadpool_info

        seen = {
            "frameworks": sorted(name for name in FRAMEWORKS if name in sys.modules),
            "worker": Path(sys.argv[0]).name == "default_worker.py",  # Ray's worker process entry point
            "blas-threads": [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"],
        }
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
