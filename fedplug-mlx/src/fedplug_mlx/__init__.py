"""fedplug's MLX backend: Flower's quickstart-mlx (an MLP on MNIST with SGD) as a plugin.

This module must not import MLX: the framework is imported by ``nets`` and
``training`` the first time the backend is used.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

import fedplug
from fedplug import BackendUnavailable, Config, DataSpec, Framework, Weights
from fedplug.backend import Scalar
from fedplug_mlx import availability

if TYPE_CHECKING:
    from fedplug_mlx.nets import Net


class MlxBackend(fedplug.Backend):
    name = "mlx"
    description = "Apple MLX (Metal on Apple silicon, CPU on Linux): MLP and LeNet with SGD"
    framework = Framework("mlx", "mlx" if platform.system() == "Darwin" else "mlx[cpu]")
    models = ("mlp", "lenet")
    defaults: ClassVar[dict[str, Scalar]] = {
        "model": "mlp",
        "hidden-dims": "32,32",
        "lr": 0.1,
        "batch-size": 256,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "num-supernodes": 10,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
    }
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".safetensors"

    def check_available(self) -> None:
        if problem := availability.problem():
            raise BackendUnavailable(f"backend 'mlx' cannot run here: {problem}")

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Net:
        from fedplug_mlx import nets

        return nets.build(model, spec, config)

    def get_weights(self, model: Net) -> Weights:
        from fedplug_mlx import nets

        return nets.get_weights(model)

    def set_weights(self, model: Net, weights: Weights) -> None:
        from fedplug_mlx import nets

        nets.set_weights(model, weights)

    def train(self, model: Net, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_mlx import training

        return training.train(model, x, y, config)

    def evaluate(self, model: Net, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_mlx import training

        return training.evaluate(model, x, y)

    def predict(self, model: Net, x: np.ndarray) -> np.ndarray:
        from fedplug_mlx import training

        return training.predict(model, x)

    def save(self, model: Net, path: Path) -> None:
        model.save_weights(str(path))

    def load(self, model: Net, path: Path) -> Net:
        model.load_weights(str(path), strict=True)
        return model


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(MlxBackend())
