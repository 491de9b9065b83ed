"""The Keras models: the quickstart's CNN and the shared ``mlp`` and ``lenet``, compiled once.

Images enter channels-last ``(H, W, C)`` (``mlp``: flat ``C*H*W`` features). Every
model returns logits, as the contract asks (the quickstart's ``cnn`` ends in a softmax;
here its loss takes the logits instead, which trains the same).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from fedplug.backend import Config, DataSpec, ModelError
from fedplug.custom import type_name
from fedplug.models import LENET_CONV, LENET_DENSE, hidden_dims, lenet_flat_features
from fedplug_keras.framework import import_keras, set_seed
from fedplug_keras.optimizers import compile_model

CNN_CONV = (32, 64)
CNN_DROPOUT = 0.5
CNN_MIN_SIZE = 10
"""Smallest image side the cnn accepts: 10 -> conv 8 -> pool 4 -> conv 2 -> pool 1."""


def build(model: str, spec: DataSpec, config: Config) -> Any:
    """Build and compile ``model`` for ``spec``, seeded by ``config['seed']``."""
    keras = import_keras(config)
    set_seed(keras, int(config.get("seed", 0)))
    if model == "mlp":
        body = _mlp(keras, spec, config)
    elif model == "lenet":
        body = _lenet(keras, spec, config)
    else:
        body = _cnn(keras, spec)
    net = keras.Sequential(body, name=model)
    compile_model(keras, net)
    return net


def build_custom(make: Callable[[], Any], config: Config) -> Any:
    """The user's Keras model (with a defined input), seeded by ``config['seed']``, compiled as the others."""
    keras = import_keras(config)
    set_seed(keras, int(config.get("seed", 0)))
    net = make()
    if not isinstance(net, keras.Model):
        raise ModelError(f"custom model {config['model']} returned a {type_name(net)}, not a keras.Model")
    if not getattr(net, "inputs", None):
        raise ModelError(
            f"custom model {config['model']} has no defined input: build a Sequential or functional model "
            "starting with keras.Input((H, W, C))"
        )
    net._fedplug_custom = True  # its native file is read back with load_weights: no architecture to deserialize
    compile_model(keras, net)
    return net


def native_variables(net: Any) -> list[tuple[str, Any]]:
    """``(name, variable)`` of the float weights of a custom model, in Keras's order.

    Named ``layers.<i>.<variable name>`` after the model's ``i``-th layer (``layers.0.kernel``,
    ``layers.1.moving_mean``): Keras's own layer names carry a per-process counter
    (``conv2d_3``), which would differ between the server and the nodes.
    """
    named: list[tuple[str, Any]] = []
    for i, layer in enumerate(net.layers):
        variables = [v for v in layer.weights if "float" in str(v.dtype)]
        clash = len({v.name for v in variables}) < len(variables)
        named += [(f"layers.{i}.{j}.{v.name}" if clash else f"layers.{i}.{v.name}", v) for j, v in enumerate(variables)]
    return named


def _image_input(keras: ModuleType, spec: DataSpec) -> Any:
    channels, height, width = spec.input_shape
    return keras.Input((height, width, channels))


def _mlp(keras: ModuleType, spec: DataSpec, config: Config) -> list[Any]:
    dense = keras.layers.Dense
    hidden = [dense(units, activation="relu") for units in hidden_dims(config)]
    return [keras.Input((spec.num_features,)), *hidden, dense(spec.num_classes)]


def _lenet(keras: ModuleType, spec: DataSpec, config: Config) -> list[Any]:
    layers = keras.layers
    lenet_flat_features(spec)  # raises ModelError for images that are too small
    pool = layers.AveragePooling2D if config.get("pool", "max") == "avg" else layers.MaxPooling2D
    body = [_image_input(keras, spec)]
    for filters, kernel in LENET_CONV:
        body += [layers.Conv2D(filters, kernel, activation="relu"), pool(2)]
    body.append(layers.Flatten())
    body += [layers.Dense(units, activation="relu") for units in LENET_DENSE]
    return [*body, layers.Dense(spec.num_classes)]


def _cnn(keras: ModuleType, spec: DataSpec) -> list[Any]:
    """The quickstart's CNN: two 3x3 conv + 2x2 max-pool blocks, dropout, a dense layer (logits)."""
    layers = keras.layers
    if min(spec.input_shape[1:]) < CNN_MIN_SIZE:
        raise ModelError(f"cnn needs images of at least {CNN_MIN_SIZE}x{CNN_MIN_SIZE}, got {spec.input_shape[1:]}")
    body = [_image_input(keras, spec)]
    for filters in CNN_CONV:
        body += [layers.Conv2D(filters, 3, activation="relu"), layers.MaxPooling2D(2)]
    return [
        *body,
        layers.Flatten(),
        layers.Dropout(CNN_DROPOUT),
        layers.Dense(spec.num_classes),
    ]
