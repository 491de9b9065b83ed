"""The MLX implementation: one training step per model and optimiser, built once and reused every round.

On a GPU (Metal, CUDA) the step is compiled with ``mx.compile``, capturing the model and
optimizer state as implicit inputs and outputs (MLX's documented pattern), so weights
loaded with ``set_weights`` and each round's learning rate (an array in the optimizer
state) reach it without a recompile. On the CPU it is not compiled: there MLX compiles
fused kernels by running ``g++`` (seconds on first use, and a crash where no compiler is
installed) and the compiled step measured no faster than the plain one.

MLX is lazy: every step ends in ``mx.eval`` of the parameters, the optimizer state and
the running loss sums, as MLX's examples do; the sums are read on the host once per call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from fedplug import Config, DataSpec, Implementation, Weights
from fedplug.toolkit import (
    ADAM_BETAS,
    ADAM_EPS,
    TrainSettings,
    eval_chunks,
    evaluation,
    from_canonical,
    metrics,
    to_canonical,
)
from fedplug_mlx import nets
from fedplug_mlx.nets import Net

Params = dict[str, Any]
"""A tree of parameters, as ``nn.Module.trainable_parameters()`` returns it."""


def proximal_loss(net: Net, x: mx.array, y: mx.array, anchor: Params, mu: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy plus FedProx's ``mu / 2 * ||w - w_global||^2``; also the logits."""
    logits = net(x)
    loss = nn.losses.cross_entropy(logits, y, reduction="mean")
    drift = tree_map(lambda w, w0: mx.sum(mx.square(w - w0)), net.trainable_parameters(), anchor)
    return loss + 0.5 * mu * sum(value for _, value in tree_flatten(drift)), logits


def make_optimizer(kind: str, momentum: float) -> optim.Optimizer:
    """The contract's optimiser: ``mlx.optimizers.SGD`` (momentum, no dampening) or ``Adam`` with bias
    correction (PyTorch's form); the weight decay is added to the gradients by the step."""
    if kind == "adam":
        return optim.Adam(learning_rate=0.0, betas=list(ADAM_BETAS), eps=ADAM_EPS, bias_correction=True)
    return optim.SGD(learning_rate=0.0, momentum=momentum)


def zero_state(tree: dict[str, Any] | list[Any]) -> None:
    """Zero every array of an optimizer state tree in place (moments, step), keeping its containers."""
    for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
        if isinstance(value, mx.array):
            tree[key] = mx.zeros_like(value)  # type: ignore[index]
        else:
            zero_state(value)


class Trainer:
    """One optimiser (``kind``, ``momentum``) and the training step of one model, compiled if ``compiled``.

    The optimizer's state is zeroed at the start of every ``fit`` (no state across ``train``
    calls); the learning rate (optimizer state), the weight decay and FedProx's ``mu`` (step
    arguments) are arrays, so changing them reuses a compiled step.
    """

    def __init__(self, net: Net, kind: str, momentum: float, compiled: bool) -> None:
        self.net = net
        self.optimizer = make_optimizer(kind, momentum)
        self.optimizer.init(net.trainable_parameters())
        loss_and_grad = nn.value_and_grad(net, proximal_loss)

        def step(x: mx.array, y: mx.array, anchor: Params, mu: mx.array, decay: mx.array) -> tuple[mx.array, mx.array]:
            (loss, logits), grads = loss_and_grad(net, x, y, anchor, mu)
            grads = tree_map(lambda g, w: g + decay * w, grads, net.trainable_parameters())
            self.optimizer.update(net, grads)
            return loss * y.size, mx.sum(mx.argmax(logits, axis=1) == y)

        if compiled:
            state = [net.state, self.optimizer.state]
            step = mx.compile(step, inputs=state, outputs=state)
        self.step = step

    def fit(self, x: mx.array, y: mx.array, settings: TrainSettings) -> dict[str, float]:
        """The optimiser for ``local-epochs`` over ``(x, y)`` in mini-batches of the core's example order."""
        zero_state(self.optimizer.state)
        self.optimizer.learning_rate = settings.lr
        mu, decay = mx.array(settings.proximal_mu), mx.array(settings.weight_decay)
        anchor = self.net.trainable_parameters()
        loss_sum, correct = mx.array(0.0), mx.array(0)
        for epoch in range(settings.epochs):
            order = mx.array(settings.order(y.size, epoch))
            for start in range(0, y.size, settings.batch_size):
                batch = order[start : start + settings.batch_size]
                batch_loss, batch_correct = self.step(x[batch], y[batch], anchor, mu, decay)
                loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
                mx.eval(loss_sum, correct, self.net.state, self.optimizer.state)
        return metrics(scalar(loss_sum), scalar(correct), y.size * settings.epochs, y.size)


def trainer(net: Net, settings: TrainSettings) -> Trainer:
    """The model's trainer for this call's optimiser, built on first use and kept on the model for later rounds.

    One per ``(optimizer, momentum)``: MLX's optimizers hold momentum as a constant of the
    step. The step is compiled where MLX computes on a GPU (Metal or CUDA), not on the CPU.
    """
    momentum = settings.momentum if settings.optimizer == "sgd" else 0.0
    trainers: dict[tuple[str, float], Trainer] = net.__dict__.setdefault("_fedplug_trainers", {})
    key = (settings.optimizer, momentum)
    if key not in trainers:
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        trainers[key] = Trainer(net, settings.optimizer, momentum, compiled=on_gpu)
    return trainers[key]


def scalar(value: mx.array) -> float:
    """A real scalar array's value (MLX types ``item()`` as possibly complex)."""
    return float(np.asarray(value))


def labels(y: np.ndarray) -> mx.array:
    return mx.array(y.astype(np.int32))


def logits(net: Net, x: mx.array) -> mx.array:
    return mx.concatenate([net(x[chunk]) for chunk in eval_chunks(x.shape[0])])


class MlxImplementation(Implementation):
    """MLX modules, channels-last: conv weights ``(out, kh, kw, in)``, linear weights ``(out, in)``."""

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Net:
        return nets.build(model, spec, config)

    def build_custom(self, make: Callable[[], Any], spec: DataSpec, config: Config) -> nn.Module:
        return nets.build_custom(make, config)

    def get_native_weights(self, model: nn.Module) -> Weights:
        """MLX's own names (``conv1.weight``, ``layers.0.bias``) and layouts (conv ``(out, kh, kw, in)``)."""
        return {name: np.array(value, dtype=np.float32) for name, value in tree_flatten(model.parameters())}

    def set_native_weights(self, model: nn.Module, weights: Weights) -> None:
        model.load_weights([(name, mx.array(np.asarray(value, np.float32))) for name, value in weights.items()])

    def get_weights(self, model: Net) -> Weights:
        """The parameters as fresh float32 numpy arrays in the canonical layout."""
        weights: Weights = {}
        for name, value in tree_flatten(model.parameters()):
            weights[name] = to_canonical(np.array(value, dtype=np.float32), "ohwi")
        return weights

    def set_weights(self, model: Net, weights: Weights) -> None:
        """Load canonical weights; names and shapes must match the model exactly."""
        native = []
        for name, value in weights.items():
            native.append((name, mx.array(from_canonical(np.asarray(value, dtype=np.float32), "ohwi"))))
        model.load_weights(native, strict=True)

    def train(self, model: Net, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        settings = TrainSettings.from_config(config)
        if not isinstance(model, nets.LeNet):  # a custom model's modes are the user's
            return trainer(model, settings).fit(model.native_input(x), labels(y), settings)
        model.train()  # lenet-bn: batch statistics, running ones updated
        try:
            return trainer(model, settings).fit(model.native_input(x), labels(y), settings)
        finally:
            model.eval()

    def evaluate(self, model: Net, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        return evaluation(self.predict(model, x), y)

    def predict(self, model: Net, x: np.ndarray) -> np.ndarray:
        return np.array(logits(model, model.native_input(x)))

    def save(self, model: Net, path: Path) -> None:
        model.save_weights(str(path))

    def load(self, model: Net, path: Path) -> Net:
        model.load_weights(str(path), strict=True)
        return model
