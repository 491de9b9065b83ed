"""Time a backend's ``train`` and ``evaluate`` calls 1, 2, 3 on one model, as a client process makes them.

    python benchmarks/backend_calls.py jax                 # the backend's default model, then mlp
    python benchmarks/backend_calls.py keras cnn lenet     # these models

A simulation worker builds one model per process and, for every node and round, loads the
server's weights into it and calls ``train`` or ``evaluate`` with that round's config
(``fedplug.apps``). This script does the same in process, on MNIST-shaped random data (1,200
training and 200 test examples: one of 50 MNIST partitions), each call with another server
round, partition and learning rate. Call 1 pays the one-off costs (lazy imports, tracing,
compiling, kernel selection); calls 2 and 3 should cost only the computation.

``retraced`` counts the calls after the first during which the framework traced or compiled
anything, where it tells: JAX's trace and compile events (Flax, or Keras on JAX), the tracing count of the
tf.functions of a Keras model's ``train_function`` and ``test_function`` (Keras on TensorFlow),
Gluon's cached graph being replaced (MXNet). PyTorch and MLX on the CPU compile nothing
(``-``). The counting is ``fedplug.testing.rebuilds.count_rebuilds``, installed with fedplug-core,
which a backend's own tests can use too. Not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from fedplug.apps import backend_and_config
from fedplug.backend import DataSpec
from fedplug.testing.rebuilds import count_rebuilds

SPEC = DataSpec((1, 28, 28), 10)
TRAIN, TEST, CALLS = 1200, 200, 3


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *SPEC.input_shape)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def measure(name: str, model_name: str) -> None:
    backend, config = backend_and_config({"backend": name, "model": model_name, "seed": 1})
    started = time.perf_counter()
    model = backend.build_model(model_name, SPEC, config)
    build = time.perf_counter() - started
    calls = count_rebuilds(backend, model, config, data(TRAIN, 0), data(TEST, 1), calls=CALLS)
    retraced = str(len(calls.rebuilt)) if calls.seen else "-"
    train = " ".join(f"{t:6.3f}" for t in calls.train_seconds)
    evaluate = " ".join(f"{t:6.3f}" for t in calls.evaluate_seconds)
    print(f"{name:6} {model_name:6} build {build:6.3f}  train {train}  evaluate {evaluate}  retraced {retraced}")


def main() -> None:
    name, *models = sys.argv[1:]
    if not models:
        _, config = backend_and_config({"backend": name})
        models = list(dict.fromkeys([str(config["model"]), "mlp"]))
    for model_name in models:
        measure(name, model_name)


if __name__ == "__main__":
    main()
