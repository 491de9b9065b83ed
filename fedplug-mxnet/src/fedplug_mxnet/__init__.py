"""fedplug-mxnet: the ``mxnet`` backend, Apache MXNet Gluon (Flower's quickstart-mxnet).

This module is the light descriptor and imports no MXNet: the implementation,
``fedplug_mxnet.training``, does on first use, after the numpy compatibility step of ``framework``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import fedplug
from fedplug import Backend, Framework, Scalar
from fedplug_mxnet.framework import INSTALL_HINT


class MXNetBackend(Backend):
    name = "mxnet"
    description = "Apache MXNet Gluon (retired): hybridized MLP and LeNet, SGD (as quickstart-mxnet) or Adam"
    framework = Framework("mxnet", "mxnet==1.9.1", also=(("numpy", "numpy<2"),), hint=INSTALL_HINT)
    implementation = "fedplug_mxnet.training:MXNetImplementation"
    models = ("mlp", "lenet")
    quickstart: ClassVar[Mapping[str, Scalar]] = {
        # quickstart-mxnet: Dense 256 relu -> Dense 64 relu -> Dense 10, SGD lr 0.01
        # (its second Trainer wins), batch 100, 2 epochs, 2 clients both sampled, 3 rounds
        # (only where they differ from the core's; --preset quickstart)
        "hidden-dims": "256,64",
        "lr": 0.01,
        "batch-size": 100,
        "local-epochs": 2,
        "num-supernodes": 2,
    }
    # made for 60,000 digits; on the 12,000 embedded ones a tenfold lr (the core's 0.1) learns in the same
    # 3 rounds (90.1%, docs/performance.md)
    defaults: ClassVar[Mapping[str, Scalar]] = {
        "hidden-dims": "256,64",
        "batch-size": 100,
        "local-epochs": 2,
        "num-supernodes": 2,
    }
    presets: ClassVar[Mapping[str, Mapping[str, Scalar]]] = {"quickstart": quickstart}
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".params"
    notice = (
        "MXNet is retired (moved to the Apache Attic; last release 1.9.1, 2022): for maintained "
        "backends use fedplug-torch, fedplug-jax, fedplug-keras or fedplug-mlx."
    )


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(MXNetBackend())
