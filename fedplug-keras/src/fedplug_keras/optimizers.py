"""The contract's optimiser as one Keras optimizer, for every Keras backend (TensorFlow, JAX, PyTorch).

Keras's own ``SGD``/``Adam`` differ from the contract (``fedplug.toolkit.TrainSettings``):
Adam adds epsilon before the bias correction, ``weight_decay`` is decoupled, and there
is no FedProx term. ``ContractOptimizer`` implements the contract's update in ``keras.ops``
(``update_step``, as Keras documents for custom optimizers), so it runs inside ``fit``'s
compiled step on any backend:

- each gradient gets ``weight_decay * w + proximal_mu * (w - w_start)``, ``w_start``
  held in an ``anchor`` variable per weight (the weights at the start of the ``train`` call);
- ``sgd``: ``v = momentum * v + g``; ``w -= lr * v``;
- ``adam``: ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
  ``w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

The optimiser's kind (SGD or Adam), learning rate, momentum, weight decay and ``mu`` are
optimizer variables, so new values reuse the compiled step (one graph per model, whatever
the run config); ``restart`` zeroes the state for each call.
Keras is imported by the caller (``import_keras``) before anything here runs.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from fedplug.toolkit import ADAM_BETAS, ADAM_EPS, TrainSettings

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
