"""fedplug-mxnet: the ``mxnet`` backend, Apache MXNet Gluon (Flower's quickstart-mxnet).

This module is the light descriptor and imports no MXNet: the implementation,
``fedplug_mxnet.training``, does on first use, after the numpy compatibility step of ``compat``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

import fedplug
from fedplug import Backend, BackendUnavailable, Framework
from fedplug.backend import Scalar
from fedplug_mxnet.compat import INSTALL_HINT, numpy_supported


class MXNetBackend(Backend):
    name = "mxnet"
    description = "Apache MXNet Gluon (retired): hybridized MLP and LeNet, SGD (as quickstart-mxnet) or Adam"
    framework = Framework("mxnet", "mxnet==1.9.1")
    implementation = "fedplug_mxnet.training:MXNetImplementation"
    models = ("mlp", "lenet")
    defaults: ClassVar[Mapping[str, Scalar]] = {
        # quickstart-mxnet: Dense 256 relu -> Dense 64 relu -> Dense 10, SGD lr 0.01
        # (its second Trainer wins), batch 100, 2 epochs, 2 clients both sampled, 3 rounds
        "model": "mlp",
        "hidden-dims": "256,64",
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.0,
        "batch-size": 100,
        "local-epochs": 2,
        "num-server-rounds": 3,
        "num-supernodes": 2,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
    }
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".params"
    notice = (
        "MXNet is retired (moved to the Apache Attic; last release 1.9.1, 2022): for maintained "
        "backends use fedplug-torch, fedplug-jax, fedplug-keras or fedplug-mlx."
    )

    def check_available(self) -> None:
        if not self.framework.is_installed():
            raise BackendUnavailable(f"backend 'mxnet' needs mxnet 1.9.1: {INSTALL_HINT}")
        if not numpy_supported():
            raise BackendUnavailable(
                f"mxnet 1.9.1 cannot run with numpy {np.__version__} (it needs numpy<2): {INSTALL_HINT}"
            )


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(MXNetBackend())
