"""fedplug backend ``keras``: Keras 3 on TensorFlow (or JAX / PyTorch), as Flower's quickstart-tensorflow.

Importing this package imports no framework: Keras is imported by the first
``build_model``, after ``KERAS_BACKEND`` is set from the run config (``framework.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import fedplug
from fedplug.backend import Backend, Config, DataSpec, Framework, Scalar, Weights
from fedplug_keras import layout, nets, training
from fedplug_keras.framework import CONFIG_KEY, DEFAULT_BACKEND, check_choice, check_installed


class KerasBackend(Backend):
    name = "keras"
    description = "Keras 3 on TensorFlow (or JAX/PyTorch): quickstart-tensorflow's CNN with Adam"
    framework = Framework("keras", "keras>=3")
    models = ("cnn", "mlp", "lenet")
    defaults: ClassVar[Mapping[str, Scalar]] = {
        "model": "cnn",
        "lr": 0.001,
        "batch-size": 32,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "num-supernodes": 10,
        "fraction-train": 0.5,
        "fraction-evaluate": 1.0,
        CONFIG_KEY: DEFAULT_BACKEND,
    }
    quickstart_dataset = "uoft-cs/cifar10"
    file_suffix = ".keras"
    unsupported = frozenset({"proximal-mu"})  # fit() has no FedProx term: fedplug refuses --strategy fedprox

    def check_available(self) -> None:
        check_installed()

    def check_config(self, config: Config) -> None:
        check_choice(config)

    def environment(self, config: Config) -> dict[str, str]:
        # Flower's simulation imports TensorFlow, and TensorFlow imports Keras, before any
        # backend code runs: the Keras backend must be chosen in the environment first.
        return {"KERAS_BACKEND": check_choice(config)}

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Any:
        return nets.build(model, spec, config)

    def get_weights(self, model: Any) -> Weights:
        return layout.get_weights(model)

    def set_weights(self, model: Any, weights: Weights) -> None:
        layout.set_weights(model, weights)

    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        return training.train(model, x, y, config)

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        return training.evaluate(model, x, y, config)

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        return training.predict(model, x)

    def save(self, model: Any, path: Path) -> None:
        training.save(model, path)

    def load(self, model: Any, path: Path) -> Any:
        return training.load(model, path)


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(KerasBackend())
