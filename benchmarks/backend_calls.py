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
(``-``). Not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np

from fedplug.apps import backend_and_config
from fedplug.backend import DataSpec

SPEC = DataSpec((1, 28, 28), 10)
TRAIN, TEST, CALLS = 1200, 200, 3


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *SPEC.input_shape)).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)


def jax_events() -> Callable[[Any], object] | None:
    """A probe counting JAX's trace and compile events, if JAX is imported (Flax, or Keras on JAX)."""
    if "jax" not in sys.modules:
        return None
    import jax

    events: list[str] = []

    def listen(event: str, duration: float, **kwargs: object) -> None:
        if event.endswith(("/jaxpr_trace_duration", "/backend_compile_duration")):
            events.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    return lambda model: len(events)


def keras_traces(model: Any) -> object:
    """The tracing counts of the tf.functions behind a Keras model's train and test functions (TensorFlow)."""
    counts = []
    for name in ("train_function", "test_function"):
        function = getattr(model, name, None)
        if callable(function):
            cells = inspect.getclosurevars(function).nonlocals.values()
            counts += [
                cell.experimental_get_tracing_count()
                for cell in cells
                if hasattr(cell, "experimental_get_tracing_count")
            ]
    return tuple(counts) or None


def mxnet_graph(model: Any) -> object:
    """Gluon's cached graph of a hybridized network (MXNet)."""
    net = getattr(model, "net", None)
    return id(net._cached_op) if getattr(net, "_cached_op", None) is not None else None


def measure(name: str, model_name: str) -> None:
    backend, config = backend_and_config({"backend": name, "model": model_name, "seed": 1})
    started = time.perf_counter()
    model = backend.build_model(model_name, SPEC, config)
    build = time.perf_counter() - started
    weights = backend.get_weights(model)
    (x, y), (x_test, y_test) = data(TRAIN, 0), data(TEST, 1)
    probes = [probe for probe in (jax_events(), keras_traces, mxnet_graph) if probe is not None]
    train, evaluate, states = [], [], []
    for call in range(1, CALLS + 1):
        step = {**config, "server-round": call, "partition-id": call, "lr": float(config["lr"]) / call}
        backend.set_weights(model, weights)
        started = time.perf_counter()
        backend.train(model, x, y, step)
        train.append(time.perf_counter() - started)
        backend.set_weights(model, weights)
        started = time.perf_counter()
        backend.evaluate(model, x_test, y_test, step)
        evaluate.append(time.perf_counter() - started)
        states.append(tuple(probe(model) for probe in probes))
    seen = any(value is not None for value in states[0])
    retraced = str(sum(now != before for before, now in pairwise(states))) if seen else "-"
    seconds = " ".join(f"{t:6.3f}" for t in train), " ".join(f"{t:6.3f}" for t in evaluate)
    print(f"{name:6} {model_name:6} build {build:6.3f}  train {seconds[0]}  evaluate {seconds[1]}  retraced {retraced}")


def main() -> None:
    name, *models = sys.argv[1:]
    if not models:
        _, config = backend_and_config({"backend": name})
        models = list(dict.fromkeys([str(config["model"]), "mlp"]))
    for model_name in models:
        measure(name, model_name)


if __name__ == "__main__":
    main()
