"""fedplug's PyTorch backend: the Flower PyTorch quickstart, plus the shared MLP and LeNet.

This module is the light descriptor; ``fedplug_torch.training`` (the implementation,
which imports torch through ``framework``) is imported by fedplug the first time the backend is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import fedplug
from fedplug import Scalar


class TorchBackend(fedplug.Backend):
    name = "torch"
    description = "PyTorch: the quickstart CNN (LeNet) and an MLP, SGD with momentum"
    framework = fedplug.Framework("torch", "torch>=2.2")
    implementation = "fedplug_torch.training:TorchImplementation"
    models = ("lenet", "mlp", "lenet-bn")
    # the Flower PyTorch quickstart's settings, where they differ from the core's (--preset quickstart)
    quickstart: ClassVar[Mapping[str, Scalar]] = {
        "model": "lenet",
        "lr": 0.001,
        "momentum": 0.9,
        "num-server-rounds": 1,
        "num-supernodes": 2,
    }
    # made for CIFAR-10's 50,000 images; on the 12,000 embedded digits a tenfold lr and a second round
    # learn (93.6%, docs/performance.md)
    defaults: ClassVar[Mapping[str, Scalar]] = {**quickstart, "lr": 0.01, "num-server-rounds": 2}
    presets: ClassVar[Mapping[str, Mapping[str, Scalar]]] = {"quickstart": quickstart}
    custom_models = (
        "a torch.nn.Module taking float32 images (N, C, H, W) in [0, 1] and returning logits (N, num_classes)"
    )
    quickstart_dataset = "uoft-cs/cifar10"
    file_suffix = ".pt"


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(TorchBackend())
