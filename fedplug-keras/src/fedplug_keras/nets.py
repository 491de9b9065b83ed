"""The Keras models: the quickstart's CNN and the shared ``mlp`` and ``lenet``, compiled once.

Images enter channels-last ``(H, W, C)`` (``mlp``: flat ``C*H*W`` features). Every
model returns logits, as the contract asks (the quickstart's ``cnn`` ends in a softmax;
here its loss takes the logits instead, which trains the same).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from fedplug.backend import Config, DataSpec, ModelError
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
