"""fedplug's MLX backend: Flower's quickstart-mlx (an MLP on MNIST with SGD) as a plugin.

This module is the light descriptor: it must not import MLX. The implementation,
``fedplug_mlx.training``, imports MLX the first time the backend is used.
"""

from __future__ import annotations

import platform
from typing import Any, ClassVar

import fedplug
from fedplug import BackendUnavailable
from fedplug.backend import Scalar
from fedplug_mlx import availability


class MlxBackend(fedplug.Backend):
    name = "mlx"
    description = "Apple MLX (Metal on Apple silicon, CPU on Linux): MLP and LeNet with SGD or Adam"
    framework = fedplug.Framework("mlx", "mlx" if platform.system() == "Darwin" else "mlx[cpu]")
    implementation = "fedplug_mlx.training:MlxImplementation"
    models = ("mlp", "lenet")
    defaults: ClassVar[dict[str, Scalar]] = {
        "model": "mlp",
        "hidden-dims": "32,32",
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.0,
        "batch-size": 256,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "num-supernodes": 10,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
    }
    custom_models = (
        "an mlx.nn.Module taking float32 images channels-last (N, H, W, C) in [0, 1] (or what its own "
        "native_input(x) makes of numpy (N, C, H, W)) and returning logits (N, num_classes)"
    )
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".safetensors"

    def check_available(self) -> None:
        if problem := availability.problem():
            raise BackendUnavailable(f"backend 'mlx' cannot run here: {problem}")


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(MlxBackend())
