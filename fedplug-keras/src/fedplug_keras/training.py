"""The Keras implementation: ``fit``/``evaluate``/``predict`` on a model compiled once.

Keras caches its compiled step functions on the model (``train_function`` and co.),
so reusing one model object across rounds reuses one graph. Nothing here
recompiles, rebuilds or calls ``keras.backend.clear_session``, and on TensorFlow the
data reaches Keras as a ``tf.data`` pipeline that traces no function (``feed``).

Keras keeps dense kernels ``(in, out)`` and conv kernels ``(kh, kw, in, out)``, and its
channels-last ``Flatten`` orders features ``(H, W, C)``: the first dense layer after a
feature map gets its input rows permuted at the weights boundary (``fedplug.toolkit``),
so the Keras model itself stays the plain quickstart architecture.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedplug import Config, DataSpec, Implementation, Weights, toolkit
from fedplug_keras import nets
from fedplug_keras.framework import import_keras, set_seed

FeatureMap = tuple[int, int, int] | None
"""``(H, W, C)`` of the feature map a dense layer's input was flattened from, or None."""


def parametrised_layers(net: Any) -> Iterator[tuple[Any, FeatureMap]]:
    """The layers holding weights, in order, each with the feature map it flattens (if any)."""
    feature_map: FeatureMap = None
    for layer in net.layers:
        if layer.weights:
            yield layer, feature_map
            feature_map = None
        shape = tuple(layer.output.shape[1:])
        if len(shape) == 3:
            feature_map = shape


def canonical_layers(net: Any) -> Iterator[tuple[str, Any, FeatureMap]]:
    """``(canonical name prefix, layer, feature map)`` of the layers holding weights: ``layers.<i>`` for convs and
    dense layers, ``norm.<i>`` for ``lenet-bn``'s normalisation layers (those with non-trainable weights)."""
    layers = norms = 0
    for layer, feature_map in parametrised_layers(net):
        if layer.non_trainable_weights:
            yield f"{toolkit.NORM_PREFIX}{norms}", layer, feature_map
            norms += 1
        else:
            yield f"layers.{layers}", layer, feature_map
            layers += 1


def model_inputs(net: Any, x: np.ndarray) -> np.ndarray:
    """NCHW images as the model takes them: NHWC, or flat ``C*H*W`` features for ``mlp``."""
    if len(net.input_shape) == 2:
        return x.reshape(len(x), -1)
    return toolkit.channels_last(x)


def feed(inputs: np.ndarray, labels: np.ndarray | None, batch_size: int) -> dict[str, Any]:
    """The data arguments of ``fit``, ``evaluate`` or ``predict``: these batches, in this order.

    Given numpy arrays, Keras on TensorFlow builds a ``tf.data`` pipeline whose slicing
    functions it traces anew on every call (most of an ``evaluate`` call's time on a
    partition); the same batches from ``from_tensor_slices`` and ``batch`` trace nothing.
    Keras on JAX or PyTorch iterates the numpy arrays themselves.
    """
    if sys.modules["keras"].backend.backend() != "tensorflow":
        arrays = {"x": inputs, "batch_size": batch_size}
        return arrays if labels is None else {**arrays, "y": labels}
    import tensorflow as tf

    tensors = inputs if labels is None else (inputs, labels)
    return {"x": tf.data.Dataset.from_tensor_slices(tensors).batch(batch_size)}


def reseed(net: Any, seed: int) -> None:
    """Make this call's randomness (shuffling, dropout) depend on ``seed`` only.

    Dropout layers keep a seed state that advances with every step; restarting it
    keeps a process that trains several nodes in turn from mixing their histories.
    """
    for layer in net.layers:
        generator = getattr(layer, "seed_generator", None)
        if generator is not None:
            generator.state.assign(np.array([seed, 0], dtype=generator.state.dtype))


class KerasImplementation(Implementation):
    """Keras ``Sequential`` models compiled once, trained with the contract's optimiser restarted every call."""

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Any:
        return nets.build(model, spec, config)

    def build_custom(self, make: Callable[[], Any], spec: DataSpec, config: Config) -> Any:
        return nets.build_custom(make, config)

    def get_native_weights(self, model: Any) -> Weights:
        """Keras's own layouts (kernels ``(in, out)``, ``(kh, kw, in, out)``) under ``layers.<i>.<name>``."""
        return {name: np.array(variable.numpy(), dtype=np.float32) for name, variable in nets.native_variables(model)}

    def set_native_weights(self, model: Any, weights: Weights) -> None:
        for name, variable in nets.native_variables(model):
            variable.assign(np.asarray(weights[name], dtype=variable.dtype))

    def get_weights(self, model: Any) -> Weights:
        """The model's weights in the canonical layout, as fresh float32 arrays (``lenet-bn``: its ``norm.*`` first)."""
        norms: Weights = {}
        weights: Weights = {}
        for name, layer, feature_map in canonical_layers(model):
            arrays = [np.array(array, dtype=np.float32) for array in layer.get_weights()]
            if name.startswith(toolkit.NORM_PREFIX):
                norms.update({f"{name}.{part}": array for part, array in zip(toolkit.NORM_ARRAYS, arrays, strict=True)})
                continue
            weights[f"{name}.weight"] = toolkit.to_canonical(arrays[0], "hwio", feature_map)
            weights.update({f"{name}.bias": bias for bias in arrays[1:]})  # lenet-bn's convs have none
        return {**norms, **weights}

    def set_weights(self, model: Any, weights: Weights) -> None:
        """Load canonical weights; Keras checks every shape."""
        for name, layer, feature_map in canonical_layers(model):
            if name.startswith(toolkit.NORM_PREFIX):
                layer.set_weights([np.asarray(weights[f"{name}.{part}"]) for part in toolkit.NORM_ARRAYS])
                continue
            kernel = toolkit.from_canonical(np.asarray(weights[f"{name}.weight"]), "hwio", feature_map)
            bias = [np.asarray(weights[f"{name}.bias"])] if len(layer.weights) > 1 else []
            layer.set_weights([kernel, *bias])

    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """``local-epochs`` epochs of ``fit`` with the contract's optimiser (``nets.ContractOptimizer``,
        restarted every call), FedProx's term included, in the core's example order."""
        settings = toolkit.TrainSettings.from_config(config)
        keras = import_keras(config)
        set_seed(keras, settings.round_seed)
        reseed(model, settings.round_seed)
        nets.restart(model, settings)
        inputs, losses, accuracies = model_inputs(model, x), [], []
        for epoch in range(settings.epochs):
            order = settings.order(len(y), epoch)
            # tf.data's C++ runtime sometimes logs a benign graph-rewrite error while fit builds its input
            # pipeline, past TF_CPP_MIN_LOG_LEVEL: shown only if fit fails
            with toolkit.held_back_stderr():
                data = feed(inputs[order], y[order], settings.batch_size)
                history = model.fit(**data, epochs=1, shuffle=False, verbose=0).history
            losses += history["loss"]
            accuracies += history["accuracy"]
        return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(accuracies)), "num-examples": len(y)}

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        data = feed(model_inputs(model, x), y, toolkit.EVAL_BATCH)
        metrics = model.evaluate(**data, verbose=0, return_dict=True)
        return {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]), "num-examples": len(y)}

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)``."""
        return np.asarray(model.predict(**feed(model_inputs(model, x), None, toolkit.EVAL_BATCH), verbose=0))

    def save(self, model: Any, path: Path) -> None:
        """The native ``.keras`` archive: architecture, weights and optimizer state, no pickle."""
        model.save(path)

    def load(self, model: Any, path: Path) -> Any:
        """Copy the weights of a ``.keras`` archive into ``model``, built like the saved model.

        The archive is read by Keras's own loader in safe mode; ``model`` keeps its
        compiled functions. The saved optimizer state is not restored: each round
        restarts the optimizer anyway.
        """
        from keras.saving import load_model  # Keras is imported: ``model`` exists

        if getattr(model, "_fedplug_custom", False):  # the user's layers need no deserializing: weights only
            with warnings.catch_warnings():  # the saved optimizer state is skipped: each round restarts it
                warnings.simplefilter("ignore")
                model.load_weights(path)
            return model
        model.set_weights(load_model(path, compile=False, safe_mode=True).get_weights())
        return model
