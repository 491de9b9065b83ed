"""The Keras models: the quickstart's CNN and the shared ``mlp`` and ``lenet``, compiled once.

Images enter channels-last ``(H, W, C)`` (``mlp``: flat ``C*H*W`` features). Every
model returns logits, as the contract asks (the quickstart's ``cnn`` ends in a softmax;
here its loss takes the logits instead, which trains the same).

Every model is compiled with the contract's optimiser as one Keras optimizer, for every
Keras backend (TensorFlow, JAX, PyTorch). Keras's own ``SGD``/``Adam`` differ from the
contract (``fedplug.toolkit.TrainSettings``): Adam adds epsilon before the bias correction,
``weight_decay`` is decoupled, and there is no FedProx term. ``ContractOptimizer``
implements the contract's update in ``keras.ops`` (``update_step``, as Keras documents for
custom optimizers), so it runs inside ``fit``'s compiled step on any backend:

- each gradient gets ``weight_decay * w + proximal_mu * (w - w_start)``, ``w_start``
  held in an ``anchor`` variable per weight (the weights at the start of the ``train`` call);
- ``sgd``: ``v = momentum * v + g``; ``w -= lr * v``;
- ``adam``: ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
  ``w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

The optimiser's kind (SGD or Adam), learning rate, momentum, weight decay and ``mu`` are
optimizer variables, so new values reuse the compiled step (one graph per model, whatever
the run config); ``restart`` zeroes the state for each call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from fedplug import Config, DataSpec, ModelError
from fedplug.toolkit import (
    ADAM_BETAS,
    ADAM_EPS,
    BN_EPS,
    BN_MOMENTUM,
    LENET_CONV,
    LENET_DENSE,
    NORM_ARRAYS,
    TrainSettings,
    check_custom_model,
    hidden_dims,
    lenet_flat_features,
)
from fedplug_keras.framework import import_keras, set_seed

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
    elif model in ("lenet", "lenet-bn"):
        body = _lenet(keras, spec, config, norm=model == "lenet-bn")
    else:
        body = _cnn(keras, spec)
    net = keras.Sequential(body, name=model)
    compile_model(keras, net)
    return net


def build_custom(make: Callable[[], Any], config: Config) -> Any:
    """The user's Keras model (with a defined input), seeded by ``config['seed']``, compiled as the others."""
    keras = import_keras(config)
    set_seed(keras, int(config.get("seed", 0)))
    net = check_custom_model(make(), keras.Model, "a keras.Model", config)
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


def _lenet(keras: ModuleType, spec: DataSpec, config: Config, norm: bool = False) -> list[Any]:
    """``lenet``; ``lenet-bn`` (``norm``): each conv without bias, then ``Norm``, then the ReLU."""
    layers = keras.layers
    lenet_flat_features(spec)  # raises ModelError for images that are too small
    pool = layers.AveragePooling2D if config.get("pool", "max") == "avg" else layers.MaxPooling2D
    body = [_image_input(keras, spec)]
    for filters, kernel in LENET_CONV:
        if norm:
            body += [layers.Conv2D(filters, kernel, use_bias=False), norm_layer(keras)(), layers.ReLU(), pool(2)]
        else:
            body += [layers.Conv2D(filters, kernel, activation="relu"), pool(2)]
    body.append(layers.Flatten())
    body += [layers.Dense(units, activation="relu") for units in LENET_DENSE]
    return [*body, layers.Dense(spec.num_classes)]


@functools.cache
def norm_layer(keras: ModuleType) -> type:
    """``lenet-bn``'s batch normalisation layer (NHWC), as ``fedplug.numpy_backend.BatchNorm``; its variables are
    ``NORM_ARRAYS``. Not ``BatchNormalization``, whose moving variance takes the batch's biased variance."""

    @keras.saving.register_keras_serializable(package="fedplug_keras")
    class Norm(keras.layers.Layer):  # type: ignore[misc,name-defined]
        def build(self, input_shape: tuple[int, ...]) -> None:
            channels = (input_shape[-1],)
            for name, init, trainable in zip(
                NORM_ARRAYS, ("ones", "zeros", "zeros", "ones"), (True, True, False, False)
            ):
                setattr(self, name, self.add_weight(shape=channels, initializer=init, trainable=trainable, name=name))

        def call(self, x: Any, training: bool | None = None) -> Any:
            ops = keras.ops
            if training:
                mean, var = ops.moments(x, axes=(0, 1, 2))
                count = ops.cast(ops.size(x) // ops.shape(x)[-1], x.dtype)
                unbiased = var * count / ops.maximum(count - 1, 1)
                self.running_mean.assign((1 - BN_MOMENTUM) * self.running_mean + BN_MOMENTUM * mean)
                self.running_var.assign((1 - BN_MOMENTUM) * self.running_var + BN_MOMENTUM * unbiased)
            else:
                mean, var = self.running_mean, self.running_var
            return (x - mean) * ops.rsqrt(var + BN_EPS) * self.weight + self.bias

    return Norm


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


# -- the contract's optimiser ------------------------------------------------------------------

HYPER = ("adam", "momentum", "weight_decay", "proximal_mu")
"""The optimizer's hyper-parameter variables besides ``learning_rate`` (``adam``: 1 for Adam, 0 for SGD)."""


@functools.cache
def optimizer_class(keras: ModuleType) -> type:
    """``ContractOptimizer`` for this process's Keras (defined once Keras is imported)."""
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="fedplug")
    class ContractOptimizer(keras.optimizers.Optimizer):  # type: ignore[misc, name-defined]
        """SGD or Adam exactly as fedplug's contract defines them; ``adam`` (0 or 1) chooses, every call."""

        def __init__(self, learning_rate: float = 0.001, **kwargs: Any) -> None:
            kwargs.setdefault("name", "fedplug_contract")
            super().__init__(learning_rate=learning_rate, **kwargs)

        def build(self, variables: list[Any]) -> None:
            if self.built:
                return
            super().build(variables)
            self.hyper = {name: self.add_variable((), name=name) for name in HYPER}
            self.anchors = self.add_optimizer_variables(variables, "anchor")
            self.firsts = self.add_optimizer_variables(variables, "first_moment")
            self.seconds = self.add_optimizer_variables(variables, "second_moment")

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            index = self._get_variable_index(variable)
            dtype = variable.dtype
            lr = ops.cast(learning_rate, dtype)
            adam = ops.cast(self.hyper["adam"], "bool")
            momentum, decay, mu = (ops.cast(self.hyper[name], dtype) for name in HYPER[1:])
            g = ops.cast(gradient, dtype) + decay * variable + mu * (variable - self.anchors[index])
            first, second = self.firsts[index], self.seconds[index]
            beta1, beta2 = ADAM_BETAS
            step = ops.cast(self.iterations + 1, dtype)
            self.assign(first, ops.where(adam, beta1 * first + (1 - beta1) * g, momentum * first + g))
            self.assign(second, beta2 * second + (1 - beta2) * ops.square(g))  # unused by SGD
            correction1 = 1 - ops.power(ops.cast(beta1, dtype), step)
            correction2 = 1 - ops.power(ops.cast(beta2, dtype), step)
            adam_step = lr / correction1 * first / (ops.sqrt(second) / ops.sqrt(correction2) + ADAM_EPS)
            self.assign_sub(variable, ops.where(adam, adam_step, lr * first))

    return ContractOptimizer


def compile_model(keras: ModuleType, net: Any) -> None:
    """Compile ``net`` for fedplug: the contract's optimiser, cross-entropy on logits, accuracy."""
    net.compile(
        optimizer=optimizer_class(keras)(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def restart(net: Any, settings: TrainSettings) -> None:
    """Make ``net``'s optimizer this call's: zero state, this call's optimiser and hyper-parameters,
    and the current weights as FedProx's anchor."""
    optimizer = net.optimizer
    variables = net.trainable_variables
    if not optimizer.built:
        optimizer.build(variables)
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate.assign(settings.lr)
    values = {
        "adam": float(settings.optimizer == "adam"),
        "momentum": settings.momentum,
        "weight_decay": settings.weight_decay,
        "proximal_mu": settings.proximal_mu,
    }
    for name, value in values.items():
        optimizer.hyper[name].assign(value)
    for anchor, variable in zip(optimizer.anchors, variables, strict=True):
        anchor.assign(np.array(variable.numpy()))  # a copy: JAX's step donates each buffer once
