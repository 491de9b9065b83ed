"""How far a backend's training lands from the numpy reference's, for the same start and data.

The conformance suite's ``test_train_matches_reference`` asserts on ``reference_gap``;
a backend author (see docs/plugins.md) measures with it directly::

    python -c "from fedplug.testing.reference import report; report('torch')"
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedplug.backend import Backend, DataSpec, Scalar, Weights
from fedplug.config import resolve
from fedplug.models import SHARED_MODELS
from fedplug.numpy_backend import NumpyBackend

OPTIMISER_CASES: dict[str, dict[str, Scalar]] = {
    "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0},
    "sgd+momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "adam": {"optimizer": "adam", "lr": 0.001},
    "sgd+momentum+weight-decay+fedprox": {
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight-decay": 0.01,
        "proximal-mu": 0.5,
    },
}
"""One ``train`` call per case, each from the same start weights and data; the keys are the optimiser's."""
STEPS = {"local-epochs": 2, "batch-size": 8, "server-round": 1, "partition-id": 1}
"""Two epochs of 3 mini-batches of 8 (24 examples), in the core's example order."""


def declared_case(backend: Backend, overrides: Mapping[str, Scalar]) -> dict[str, Scalar] | None:
    """``overrides`` without the keys the backend declares unsupported; None if it declares the optimizer."""
    if f"optimizer={overrides.get('optimizer')}" in backend.unsupported:
        return None
    return {key: value for key, value in overrides.items() if key not in backend.unsupported}


def spec_for(model_name: str) -> DataSpec:
    """The data of the comparison: 16x16 grey images (LeNet: 12x12 -> 6x6 -> 2x2 -> 1x1), 3 classes."""
    return DataSpec((1, 16, 16), 3) if model_name.startswith("lenet") else DataSpec((1, 8, 8), 3)


def training_batch(spec: DataSpec, n: int = 24, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A tiny fixed batch: per-class prototype images plus noise, in ``[0, 1]``."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % spec.num_classes
    prototypes = rng.uniform(0, 1, (spec.num_classes, *spec.input_shape))
    x = np.clip(prototypes[y] + rng.normal(0, 0.1, (n, *spec.input_shape)), 0, 1)
    return x.astype(np.float32), y.astype(np.int64)


Models = dict[tuple[str, str], tuple[Any, Any, Weights]]
"""A cache of built models: ``(model, pool) -> (backend's model, reference's model, start weights)``."""


def train_from_reference(
    backend: Backend, model_name: str, overrides: Mapping[str, Scalar], pool: str = "max", models: Models | None = None
) -> tuple[Weights, Weights]:
    """``(backend's weights, reference's weights)`` after one ``train`` call each from the reference's start.

    ``models`` (optional) keeps the built models for later calls: building is the slow part
    for compiled frameworks, and every call sets the start weights again.
    """
    reference = NumpyBackend()
    config: dict[str, Any] = {**resolve(backend, {"pool": pool, "hidden-dims": "16"}), **STEPS, **overrides}
    spec = spec_for(model_name)
    x, y = training_batch(spec)
    models = {} if models is None else models
    if (model_name, pool) not in models:
        expected_model = reference.build_model(model_name, spec, config)
        start = reference.get_weights(expected_model)
        models[model_name, pool] = (backend.build_model(model_name, spec, config), expected_model, start)
    model, expected_model, start = models[model_name, pool]
    backend.set_weights(model, start)
    reference.set_weights(expected_model, start)
    backend.train(model, x, y, config)
    reference.train(expected_model, x, y, config)
    return backend.get_weights(model), reference.get_weights(expected_model)


def reference_gap(
    backend: Backend, model_name: str, overrides: Mapping[str, Scalar], pool: str = "max", models: Models | None = None
) -> float:
    """max |w - w_reference| over every weight after one ``train`` call from the same start and data."""
    got, expected = train_from_reference(backend, model_name, overrides, pool, models)
    return max(float(np.max(np.abs(np.asarray(got[key], np.float64) - expected[key]))) for key in expected)


def report(backend_name: str) -> None:
    """Print ``reference_gap`` of every optimiser case and shared model of an installed backend."""
    from fedplug.plugins import get_registry

    backend = get_registry().backends[backend_name].backend
    models: Models = {}
    for model_name in (name for name in SHARED_MODELS if name in backend.models):
        for case, overrides in OPTIMISER_CASES.items():
            declared = declared_case(backend, overrides)
            if declared is None:
                print(f"{backend_name} {model_name} {case}: declared unsupported")
                continue
            gap = reference_gap(backend, model_name, declared, models=models)
            print(f"{backend_name} {model_name} {case}: max |w - w_ref| = {gap:.2e}")
