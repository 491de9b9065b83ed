"""Local training and evaluation in MLX: one SGD step per model, built once and reused every round.

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

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from fedplug.backend import Config
from fedplug_mlx.nets import Net

Params = dict[str, Any]
"""A tree of parameters, as ``nn.Module.trainable_parameters()`` returns it."""
EVAL_BATCH = 1024
"""Examples per forward pass in ``predict`` and ``evaluate``, bounding memory."""


def proximal_loss(net: Net, x: mx.array, y: mx.array, anchor: Params, mu: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy plus FedProx's ``mu / 2 * ||w - w_global||^2``; also the logits."""
    logits = net(x)
    loss = nn.losses.cross_entropy(logits, y, reduction="mean")
    drift = tree_map(lambda w, w0: mx.sum(mx.square(w - w0)), net.trainable_parameters(), anchor)
    return loss + 0.5 * mu * sum(value for _, value in tree_flatten(drift)), logits


class Trainer:
    """The SGD optimizer and the training step of one model, compiled if ``compiled``."""

    def __init__(self, net: Net, compiled: bool) -> None:
        self.net = net
        self.optimizer = optim.SGD(learning_rate=0.0)
        self.optimizer.init(net.trainable_parameters())
        loss_and_grad = nn.value_and_grad(net, proximal_loss)

        def step(x: mx.array, y: mx.array, anchor: Params, mu: mx.array) -> tuple[mx.array, mx.array]:
            (loss, logits), grads = loss_and_grad(net, x, y, anchor, mu)
            self.optimizer.update(net, grads)
            return loss * y.size, mx.sum(mx.argmax(logits, axis=1) == y)

        if compiled:
            state = [net.state, self.optimizer.state]
            step = mx.compile(step, inputs=state, outputs=state)
        self.step = step

    def fit(self, x: mx.array, y: mx.array, config: Config) -> dict[str, float]:
        """SGD for ``local-epochs`` over ``(x, y)`` in shuffled mini-batches."""
        self.optimizer.learning_rate = float(config["lr"])
        mu = mx.array(float(config.get("proximal-mu", 0.0)))
        anchor = self.net.trainable_parameters()
        batch_size, epochs = int(config["batch-size"]), int(config["local-epochs"])
        rng = np.random.default_rng(int(config.get("seed", 0)) + int(config.get("server-round", 0)))
        loss_sum, correct = mx.array(0.0), mx.array(0)
        for _ in range(epochs):
            order = mx.array(rng.permutation(y.size))
            for start in range(0, y.size, batch_size):
                batch = order[start : start + batch_size]
                batch_loss, batch_correct = self.step(x[batch], y[batch], anchor, mu)
                loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
                mx.eval(loss_sum, correct, self.net.state, self.optimizer.state)
        seen = y.size * epochs
        return {"loss": float(loss_sum.item()) / seen, "accuracy": float(correct.item()) / seen, "num-examples": y.size}


def trainer(net: Net) -> Trainer:
    """The model's trainer, built on first use and kept on the model for later rounds.

    The step is compiled where MLX computes on a GPU (Metal or CUDA), not on the CPU.
    """
    existing = net.__dict__.get("_fedplug_trainer")
    if existing is None:
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        existing = net._fedplug_trainer = Trainer(net, compiled=on_gpu)
    return existing


def labels(y: np.ndarray) -> mx.array:
    return mx.array(y.astype(np.int32))


def train(net: Net, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    return trainer(net).fit(net.native_input(x), labels(y), config)


def logits(net: Net, x: mx.array) -> mx.array:
    return mx.concatenate([net(x[i : i + EVAL_BATCH]) for i in range(0, x.shape[0], EVAL_BATCH)])


def predict(net: Net, x: np.ndarray) -> np.ndarray:
    return np.array(logits(net, net.native_input(x)))


def evaluate(net: Net, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    scores, targets = logits(net, net.native_input(x)), labels(y)
    loss = nn.losses.cross_entropy(scores, targets, reduction="mean")
    accuracy = mx.mean(mx.argmax(scores, axis=1) == targets)
    return {"loss": float(loss.item()), "accuracy": float(accuracy.item()), "num-examples": len(y)}
