"""fedplug-mxnet: the ``mxnet`` backend, Apache MXNet Gluon (Flower's quickstart-mxnet).

This module imports no MXNet: ``nets`` and ``training`` do, on first use, after the
numpy compatibility step of ``compat``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import fedplug
from fedplug import Backend, BackendUnavailable, Config, DataSpec, Framework, Weights
from fedplug.backend import Scalar
from fedplug_mxnet.compat import INSTALL_HINT, numpy_supported


class MXNetBackend(Backend):
    name = "mxnet"
    description = "Apache MXNet Gluon (retired): hybridized MLP and LeNet with SGD, as quickstart-mxnet"
    framework = Framework("mxnet", "mxnet==1.9.1")
    models = ("mlp", "lenet")
    defaults: ClassVar[Mapping[str, Scalar]] = {
        # quickstart-mxnet: Dense 256 relu -> Dense 64 relu -> Dense 10, SGD lr 0.01
        # (its second Trainer wins), batch 100, 2 epochs, 2 clients both sampled, 3 rounds
        "model": "mlp",
        "hidden-dims": "256,64",
        "lr": 0.01,
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

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Any:
        from fedplug_mxnet import nets

        return nets.build_model(model, spec, config)

    def get_weights(self, model: Any) -> Weights:
        from fedplug_mxnet import nets

        return nets.get_weights(model)

    def set_weights(self, model: Any, weights: Weights) -> None:
        from fedplug_mxnet import nets

        nets.set_weights(model, weights)

    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_mxnet import training

        return training.train(model, x, y, config)

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_mxnet import training

        return training.evaluate(model, x, y, config)

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        from fedplug_mxnet import training

        return training.predict(model, x)

    def save(self, model: Any, path: Path) -> None:
        from fedplug_mxnet import nets

        nets.save(model, path)

    def load(self, model: Any, path: Path) -> Any:
        from fedplug_mxnet import nets

        return nets.load(model, path)


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(MXNetBackend())
