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

The learning rate, momentum, weight decay and ``mu`` are optimizer variables, so a new
value every round reuses the compiled step; ``restart`` zeroes the state for each call.
Keras is imported by the caller (``import_keras``) before anything here runs.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np

from fedplug.toolkit import ADAM_BETAS, ADAM_EPS, TrainSettings

HYPER = ("momentum", "weight_decay", "proximal_mu")
"""The optimizer's hyper-parameter variables besides ``learning_rate``."""


@functools.cache
def optimizer_class(keras: ModuleType) -> type:
    """``ContractOptimizer`` for this process's Keras (defined once Keras is imported)."""
    ops = keras.ops

    @keras.saving.register_keras_serializable(package="fedplug")
    class ContractOptimizer(keras.optimizers.Optimizer):  # type: ignore[misc, name-defined]
        """SGD (``kind="sgd"``) or Adam (``kind="adam"``) exactly as fedplug's contract defines them."""

        def __init__(self, kind: str = "sgd", learning_rate: float = 0.001, **kwargs: Any) -> None:
            kwargs.setdefault("name", f"fedplug_{kind}")
            super().__init__(learning_rate=learning_rate, **kwargs)
            self.kind = kind

        def build(self, variables: list[Any]) -> None:
            if self.built:
                return
            super().build(variables)
            self.hyper = {name: self.add_variable((), name=name) for name in HYPER}
            self.anchors = self.add_optimizer_variables(variables, "anchor")
            self.firsts = self.add_optimizer_variables(variables, "first_moment")
            self.seconds = self.add_optimizer_variables(variables, "second_moment") if self.kind == "adam" else []

        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            index = self._get_variable_index(variable)
            dtype = variable.dtype
            lr = ops.cast(learning_rate, dtype)
            momentum, decay, mu = (ops.cast(self.hyper[name], dtype) for name in HYPER)
            g = ops.cast(gradient, dtype) + decay * variable + mu * (variable - self.anchors[index])
            first = self.firsts[index]
            if self.kind == "sgd":
                self.assign(first, momentum * first + g)
                self.assign_sub(variable, lr * first)
                return
            beta1, beta2 = ADAM_BETAS
            second = self.seconds[index]
            step = ops.cast(self.iterations + 1, dtype)
            self.assign(first, beta1 * first + (1 - beta1) * g)
            self.assign(second, beta2 * second + (1 - beta2) * ops.square(g))
            correction1 = 1 - ops.power(ops.cast(beta1, dtype), step)
            correction2 = 1 - ops.power(ops.cast(beta2, dtype), step)
            denominator = ops.sqrt(second) / ops.sqrt(correction2) + ADAM_EPS
            self.assign_sub(variable, lr / correction1 * first / denominator)

        def get_config(self) -> dict[str, Any]:
            return {**super().get_config(), "kind": self.kind}

    return ContractOptimizer


def compile_model(keras: ModuleType, net: Any, kind: str) -> None:
    """Compile ``net`` for fedplug: the contract's optimiser ``kind``, cross-entropy on logits, accuracy."""
    net.compile(
        optimizer=optimizer_class(keras)(kind),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def restart(keras: ModuleType, net: Any, settings: TrainSettings) -> None:
    """Make ``net``'s optimizer this call's: its kind (recompiling if it changed), zero state, this call's
    hyper-parameters, and the current weights as FedProx's anchor."""
    if getattr(net.optimizer, "kind", None) != settings.optimizer:
        compile_model(keras, net, settings.optimizer)
    optimizer = net.optimizer
    variables = net.trainable_variables
    if not optimizer.built:
        optimizer.build(variables)
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate.assign(settings.lr)
    values = {"momentum": settings.momentum, "weight_decay": settings.weight_decay, "proximal_mu": settings.proximal_mu}
    for name, value in values.items():
        optimizer.hyper[name].assign(value)
    for anchor, variable in zip(optimizer.anchors, variables, strict=True):
        anchor.assign(keras.ops.convert_to_numpy(variable))  # a copy: JAX's step donates each buffer once
