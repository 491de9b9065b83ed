"""fedplug backend for JAX with Flax NNX and Optax: the Flower JAX quickstart's CNN.

This module imports no framework: the operations import the JAX side (``nets``,
``state``, ``training``), which imports JAX through ``framework`` once its environment is set.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

import fedplug
from fedplug.backend import Backend, BackendUnavailable, Config, DataSpec, Framework, Scalar, Weights

if TYPE_CHECKING:
    from fedplug_jax.nets import Network

REQUIREMENTS = {"jax": "jax>=0.7.1", "jaxlib": "jaxlib>=0.7.1", "flax": "flax>=0.12", "optax": "optax>=0.2"}
"""Import name -> pip requirement of each package the backend needs (pyproject.toml's bounds; jax brings jaxlib)."""


class JaxBackend(Backend):
    name = "jax"
    description = "JAX + Flax NNX + Optax: the Flower JAX quickstart's CNN, MLP and LeNet"
    framework = Framework("jax", REQUIREMENTS["jax"])
    models = ("cnn", "mlp", "lenet")
    defaults: ClassVar[Mapping[str, Scalar]] = {
        "model": "cnn",
        "lr": 0.1,
        "momentum": 0.9,
        "batch-size": 64,
        "local-epochs": 1,
        "num-server-rounds": 5,
        "num-supernodes": 50,
        "fraction-train": 0.4,
        "fraction-evaluate": 0.4,
    }
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".msgpack"

    def check_available(self) -> None:
        for module, requirement in REQUIREMENTS.items():
            if importlib.util.find_spec(module) is None:
                raise BackendUnavailable(f"backend 'jax' needs {module}: pip install '{requirement}'")

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Network:
        from fedplug_jax import nets

        return nets.build(model, spec, config)

    def get_weights(self, model: Network) -> Weights:
        from fedplug_jax import state

        return state.get_weights(model)

    def set_weights(self, model: Network, weights: Weights) -> None:
        from fedplug_jax import state

        state.set_weights(model, weights)

    def train(self, model: Network, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_jax import training

        return training.train(model, x, y, config)

    def evaluate(self, model: Network, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_jax import training

        return training.evaluate(model, x, y)

    def predict(self, model: Network, x: np.ndarray) -> np.ndarray:
        from fedplug_jax import training

        return training.predict(model, x)

    def save(self, model: Network, path: Path) -> None:
        from fedplug_jax import state

        state.save(model, path)

    def load(self, model: Network, path: Path) -> Network:
        from fedplug_jax import state

        return state.load(model, path)


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(JaxBackend())
