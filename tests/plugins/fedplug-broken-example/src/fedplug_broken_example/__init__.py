"""A deliberately broken backend: each conformance check fails on one of its mistakes.

tests/test_broken_backend.py runs the conformance suite against it and expects every
check to fail with a message that says what to fix. Its "framework" is the standard
library's ``sqlite3``, so that importing it costs nothing. The mistakes, by check:

- registered_through_entry_point: the hook also registers the class, not an instance;
- plugin_import_is_light: the framework is imported at module level;
- default_config_complete_and_typed: ``lr`` is a string and ``batch-size`` a float;
- models_build_for_data_specs: ``predict`` always returns 10 class scores;
- canonical_layout: dense weights come out as ``(in, out)`` and lenet's in reverse order;
- weights_round_trip_exactly: ``set_weights`` stores float16;
- same_predictions_as_numpy_reference: the mlp flattens images channels-last ``(H, W, C)``;
- odd_image_sizes_match_reference: the mlp's flatten again, and 10 class scores for 3 classes;
- training_lowers_loss, rounds_differ, proximal_term_applied: the mlp's ``train`` changes nothing
  (and returns numpy and float counts);
- train_keeps_no_state, optimizer_keys_read_every_call: the lenet's ``train`` keeps the first
  call's ``lr`` and a call counter (which shifts its shuffling seed) on the model, and ignores
  ``proximal-mu`` and ``optimizer`` (always SGD) without declaring them in ``unsupported``;
- optimizer_keys_honoured_or_declared, train_matches_reference: the mlp's ``train`` changes
  nothing, the lenet's keeps its first ``lr``, shifts its order and ignores Adam and FedProx;
- evaluate_returns_standard_metrics: numpy loss, ``eval_acc`` instead of ``accuracy``;
- same_seed_same_weights: ``build_model`` ignores ``config['seed']``;
- save_load_gives_identical_predictions: ``save``/``load`` use pickle;
- client_app_handles_train_and_evaluate_messages: follows from ``evaluate``'s metric names.
"""

from __future__ import annotations

import pickle
import sqlite3  # noqa: F401 - the mistake: a framework import at module level
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import fedplug
from fedplug.backend import Scalar
from fedplug.numpy_backend import NumpyBackend, NumpyImplementation, NumpyModel, softmax_cross_entropy


class BrokenExampleBackend(NumpyBackend):
    name = "broken_example"
    description = "Fails every conformance check on purpose (fedplug's own tests)"
    framework = fedplug.Framework("sqlite3", "pysqlite3")
    implementation = "fedplug_broken_example:BrokenImplementation"
    defaults: ClassVar[Mapping[str, Scalar]] = {"model": "mlp", "lr": "0.1", "batch-size": 32.0}
    file_suffix = ".pkl"
    models = ("mlp", "lenet")  # the two shared models every backend builds (not numpy's lenet-bn too)


class BrokenImplementation(NumpyImplementation):
    def build_model(self, model: str, spec: fedplug.DataSpec, config: fedplug.Config) -> NumpyModel:
        unseeded = int(np.random.SeedSequence().entropy % 2**32)  # type: ignore[operator]
        return super().build_model(model, spec, {**config, "seed": unseeded})

    def get_weights(self, model: NumpyModel) -> fedplug.Weights:
        weights = {key: value.astype(np.float32) for key, value in model.weights.items()}
        if model.name == "lenet":
            return dict(reversed(weights.items()))
        return {key: w.reshape(w.shape[::-1]) if w.ndim == 2 else w for key, w in weights.items()}

    def set_weights(self, model: NumpyModel, weights: fedplug.Weights) -> None:
        for key, value in model.weights.items():
            value[...] = weights[key].astype(np.float16).reshape(value.shape)

    def train(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: fedplug.Config) -> dict[str, float]:
        if model.name == "lenet":
            model.__dict__.setdefault("first_lr", config["lr"])  # read once, kept on the model
            model.__dict__["calls"] = model.__dict__.get("calls", 0) + 1
            kept = {"lr": model.__dict__["first_lr"], "seed": int(config["seed"]) + model.__dict__["calls"]}
            return super().train(model, x, y, {**config, **kept, "proximal-mu": 0.0, "optimizer": "sgd"})
        loss, _ = softmax_cross_entropy(self.predict(model, x), y)
        return {"loss": np.float64(loss), "num-examples": float(len(y))}

    def evaluate(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: fedplug.Config) -> dict[str, float]:
        scores = self.predict(model, x)
        loss, _ = softmax_cross_entropy(scores, y)
        accuracy = (scores.argmax(axis=1) == y).mean()
        return {"loss": np.float64(loss), "eval_acc": accuracy, "num-examples": len(y)}

    def predict(self, model: NumpyModel, x: np.ndarray) -> np.ndarray:
        if model.name == "mlp":
            x = x.transpose(0, 2, 3, 1).reshape(len(x), -1)
        scores = model.forward(x)
        tens = np.zeros((len(x), 10), dtype=scores.dtype)  # as if every dataset were MNIST
        tens[:, : min(10, scores.shape[1])] = scores[:, :10]
        return tens

    def save(self, model: NumpyModel, path: Path) -> None:
        with open(path, "wb") as file:
            pickle.dump(model, file)

    def load(self, model: NumpyModel, path: Path) -> NumpyModel:
        with open(path, "rb") as file:
            return pickle.load(file)  # type: ignore[no-any-return]


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(BrokenExampleBackend())
    register(BrokenExampleBackend)  # the class, not an instance: fedplug rejects it
