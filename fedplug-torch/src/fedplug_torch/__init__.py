"""fedplug's PyTorch backend: the Flower PyTorch quickstart, plus the shared MLP and LeNet.

Importing this module does not import torch: ``build_model`` imports
``fedplug_torch.nets`` and ``fedplug_torch.training`` the first time it runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import fedplug
from fedplug.backend import Backend, BackendUnavailable, Config, DataSpec, Framework, Scalar, Weights

MIN_TORCH = (2, 2)


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch: the quickstart CNN (LeNet) and an MLP, SGD with momentum"
    framework = Framework("torch", "torch>=2.2")
    models = ("lenet", "mlp")
    defaults: ClassVar[Mapping[str, Scalar]] = {
        "model": "lenet",
        "pool": "max",
        "lr": 0.001,
        "momentum": 0.9,
        "batch-size": 32,
        "local-epochs": 1,
        "num-server-rounds": 1,
        "num-supernodes": 2,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
    }
    quickstart_dataset = "uoft-cs/cifar10"
    file_suffix = ".pt"

    def check_available(self) -> None:
        super().check_available()
        try:
            release = version("torch").split("+")[0]
            found = tuple(int(part) for part in release.split(".")[:2])
        except (PackageNotFoundError, ValueError):
            return  # a source build without usable metadata: trust it
        if found < MIN_TORCH:
            raise BackendUnavailable(f"backend 'torch' needs torch>=2.2, found {release}: pip install -U 'torch>=2.2'")

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Any:
        # the first use of torch in a process: mute its C++ warnings (e.g. NNPACK's CPU probe)
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        from fedplug_torch import nets, training

        return nets.build(model, spec, config, training.device())

    def get_weights(self, model: Any) -> Weights:
        return {key: value.cpu().numpy().copy() for key, value in model.state_dict().items()}

    def set_weights(self, model: Any, weights: Weights) -> None:
        import torch

        model.load_state_dict(
            {key: torch.tensor(np.asarray(value, dtype=np.float32)) for key, value in weights.items()}
        )

    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_torch import training

        return training.train(model, x, y, config)

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        from fedplug_torch import training

        return training.evaluate(model, x, y)

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        from fedplug_torch import training

        return training.predict(model, x)

    def save(self, model: Any, path: Path) -> None:
        import torch

        torch.save({key: value.cpu() for key, value in model.state_dict().items()}, path)

    def load(self, model: Any, path: Path) -> Any:
        import torch

        device = next(model.parameters()).device
        model.load_state_dict(torch.load(path, weights_only=True, map_location=device))
        return model


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(TorchBackend())
