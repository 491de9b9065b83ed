"""fedplug's MLX backend: Flower's quickstart-mlx (an MLP on MNIST with SGD) as a plugin.

This module is the light descriptor: it must not import MLX. The implementation,
``fedplug_mlx.training``, imports MLX the first time the backend is used.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any, ClassVar

import fedplug
from fedplug import BackendUnavailable, Config, Scalar
from fedplug_mlx import framework as mlx_framework


class MlxBackend(fedplug.Backend):
    name = "mlx"
    description = "Apple MLX (Metal on Apple silicon, CPU on Linux): MLP and LeNet with SGD or Adam"
    framework = fedplug.Framework(
        "mlx",
        "mlx" if platform.system() == "Darwin" else "mlx[cpu]",
        platforms=("Darwin/arm64", "Linux"),  # Metal on Apple silicon; CPU or CUDA on Linux
        hint=mlx_framework.install_hint(platform.system()),
    )
    implementation = "fedplug_mlx.training:MlxImplementation"
    models = ("mlp", "lenet", "lenet-bn")
    # the Flower MLX quickstart's settings, where they differ from the core's (--preset quickstart)
    quickstart: ClassVar[dict[str, Scalar]] = {
        "hidden-dims": "32,32",
        "batch-size": 256,
        "local-epochs": 1,
        "num-server-rounds": 3,
    }
    # made for 60,000 digits: on the 12,000 embedded ones a node takes 4 steps a round; batches of 32 and
    # 2 local epochs give it the quickstart's steps per round on full MNIST, and 5 rounds learn (89.9%)
    defaults: ClassVar[dict[str, Scalar]] = {
        "hidden-dims": "32,32",
        "local-epochs": 2,
        "num-server-rounds": 5,
    }
    presets: ClassVar[Mapping[str, Mapping[str, Scalar]]] = {"quickstart": quickstart}
    custom_models = (
        "an mlx.nn.Module taking float32 images channels-last (N, H, W, C) in [0, 1] (or what its own "
        "native_input(x) makes of numpy (N, C, H, W)) and returning logits (N, num_classes)"
    )
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".safetensors"

    def check_available(self, config: Config | None = None) -> None:
        super().check_available()  # the platform and the mlx distribution
        if not mlx_framework.has_native_library():
            raise BackendUnavailable(
                f"backend 'mlx' cannot run here: mlx is installed without its compute library (libmlx): "
                f"{self.framework.hint}"
            )


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(MlxBackend())
