"""Count the ``train``/``evaluate`` calls after the first during which a framework traced or compiled anything.

A client process builds one model and, for every node and round, loads the server's weights
into it and calls ``train`` or ``evaluate`` with that round's config (another learning rate,
server round, partition). Call 1 may trace and compile (JAX, Keras, MXNet's Gluon, tinygrad,
...); later calls should only compute. A framework that compiles kernels recompiles whenever
a value it baked into a kernel changes: pass hyper-parameters (``lr``, ``momentum``, Adam's
bias corrections, ``proximal-mu``) to the compiled step as data (arrays or tensors), not as
Python constants.

A probe is a function of the model returning a value that changes whenever the framework
traced or compiled (a counter, a cache's size, an object's id), or ``None`` where it cannot
tell. ``framework_probes()`` gives the probes of the frameworks fedplug knows that are
imported now; a backend of another framework passes its own, e.g. for tinygrad::

    from tinygrad.engine.realize import method_cache
    count_rebuilds(backend, model, config, train_data, test_data, probes=[lambda model: len(method_cache)])

The conformance suite runs the framework probes, and a test class's own ``rebuild_probes()``,
in ``test_optimizer_keys_read_every_call``; ``benchmarks/backend_calls.py`` times calls with
``count_rebuilds``. Only numpy is imported here.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from fedplug.backend import Backend, Config

Probe = Callable[[Any], object]
"""``probe(model)``: a value that changes whenever the framework traced or compiled, or ``None``."""

_JAX_EVENTS: list[str] = []
_JAX_LISTENING: list[bool] = []


def jax_probe() -> Probe | None:
    """The number of JAX trace and compile events so far (Flax, or Keras on JAX), if JAX is imported."""
    if "jax" not in sys.modules:
        return None
    if not _JAX_LISTENING:  # one listener per process: JAX keeps every listener it is given
        import jax

        def listen(event: str, duration_secs: float, **kwargs: str | int) -> None:
            if event.endswith(("/jaxpr_trace_duration", "/backend_compile_duration")):
                _JAX_EVENTS.append(str(kwargs.get("fun_name")))

        jax.monitoring.register_event_duration_secs_listener(listen)
        _JAX_LISTENING.append(True)
    return lambda model: len(_JAX_EVENTS)


def keras_probe(model: Any) -> object:
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


def mxnet_probe(model: Any) -> object:
    """The id of Gluon's cached graph of a hybridized network (MXNet): a new graph, a new id."""
    cached = getattr(getattr(model, "net", None), "_cached_op", None)
    return id(cached) if cached is not None else None


def framework_probes() -> list[Probe]:
    """The probes of the frameworks fedplug knows that can tell something in this process."""
    jax = jax_probe()
    return [*([jax] if jax is not None else []), keras_probe, mxnet_probe]


def probe_state(probes: list[Probe], model: Any) -> tuple[object, ...]:
    """Every probe's value for ``model``."""
    return tuple(probe(model) for probe in probes)


def tells(state: tuple[object, ...]) -> bool:
    """Whether any probe could tell anything (a value other than ``None``)."""
    return any(value is not None for value in state)


@dataclass
class Rebuilds:
    """What ``count_rebuilds`` saw: which later calls traced or compiled, and how long each call took."""

    rebuilt: list[int]
    """The calls (numbered from 1) after the first during which a probe changed: empty is the goal."""
    seen: bool
    """Whether any probe could tell anything for this model; if not, ``rebuilt`` says nothing."""
    train_seconds: list[float] = field(default_factory=list)
    evaluate_seconds: list[float] = field(default_factory=list)


def count_rebuilds(
    backend: Backend,
    model: Any,
    config: Config,
    train_data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray],
    calls: int = 3,
    probes: list[Probe] | None = None,
) -> Rebuilds:
    """Call ``train`` then ``evaluate`` ``calls`` times on ``model``, as a client process does, and count rebuilds.

    Each call starts from the model's weights as given and gets another server round,
    partition and learning rate (``lr / call``). ``probes`` defaults to ``framework_probes()``.
    """
    probes = framework_probes() if probes is None else probes
    weights = backend.get_weights(model)
    (x, y), (x_test, y_test) = train_data, test_data
    result = Rebuilds(rebuilt=[], seen=False)
    states = []
    for call in range(1, calls + 1):
        step = {**config, "server-round": call, "partition-id": call, "lr": float(config["lr"]) / call}
        backend.set_weights(model, weights)
        started = time.perf_counter()
        backend.train(model, x, y, step)
        result.train_seconds.append(time.perf_counter() - started)
        backend.set_weights(model, weights)
        started = time.perf_counter()
        backend.evaluate(model, x_test, y_test, step)
        result.evaluate_seconds.append(time.perf_counter() - started)
        states.append(probe_state(probes, model))
    result.seen = tells(states[0])
    result.rebuilt = [call for call, (before, now) in enumerate(pairwise(states), start=2) if now != before]
    return result
