"""fedplug backend 'legacy_example': written against fedplug 0.1's contract, kept as generated.

This is the module `fedplug new-backend legacy_example` generated in fedplug 0.1 (its
operations defined on the Backend subclass itself). tests/test_legacy_backend.py checks
that it still passes the conformance suite, with one deprecation line.

As generated, it runs the built-in NumPy backend under a new name, so the project
installs, passes the conformance suite and runs with no framework. Replace each part
marked "replace this with your framework" (see docs/plugins.md in fedplug).

Import your framework inside the methods, never at module level: fedplug imports this
module for every command, and `fedplug list` must stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import fedplug
from fedplug.numpy_backend import NumpyBackend


class LegacyExampleBackend(NumpyBackend):
    """Delegates every operation to the NumPy backend until you replace it."""

    name = "legacy_example"
    description = "legacy_example: NumPy MLP and LeNet (a template: plug in your framework)"  # one line
    # replace this with your framework: its import name and pip requirement,
    # e.g. fedplug.Framework("torch", "torch>=2.2")
    framework = fedplug.Framework("numpy", "numpy")
    models = ("mlp", "lenet")  # add your quickstart's model; keep mlp and lenet
    # your quickstart's run config: model, hyper-parameters, node count, strategy settings
    defaults = {**NumpyBackend.defaults, "model": "mlp"}  # noqa: RUF012 - kept as fedplug 0.1 generated it
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".npz"  # replace this with your framework's native file, e.g. ".pt"

    def build_model(self, model: str, spec: fedplug.DataSpec, config: fedplug.Config) -> Any:
        # replace this with your framework: import it here, seed it from config["seed"],
        # build `model` for spec.input_shape (C, H, W) and spec.num_classes
        return super().build_model(model, spec, config)

    def get_weights(self, model: Any) -> fedplug.Weights:
        # replace this with your framework: convert to canonical numpy arrays,
        # layers.<i>.weight dense (out, in) / conv (out, in, kh, kw), layers.<i>.bias
        return super().get_weights(model)

    def set_weights(self, model: Any, weights: fedplug.Weights) -> None:
        # replace this with your framework: the exact inverse of get_weights
        super().set_weights(model, weights)

    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: fedplug.Config) -> dict[str, float]:
        # replace this with your framework: config["local-epochs"] epochs of
        # config["batch-size"] batches at config["lr"], shuffled with config["seed"]
        return super().train(model, x, y, config)

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: fedplug.Config) -> dict[str, float]:
        # replace this with your framework: return float loss and accuracy, int num-examples
        return super().evaluate(model, x, y, config)

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        # replace this with your framework: class scores (N, num_classes) as numpy
        return super().predict(model, x)

    def save(self, model: Any, path: Path) -> None:
        # replace this with your framework's native save (path ends in file_suffix)
        super().save(model, path)

    def load(self, model: Any, path: Path) -> Any:
        # replace this with your framework's native load, without pickle
        return super().load(model, path)


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    """fedplug calls this once; register each backend this plugin provides."""
    register(LegacyExampleBackend())
