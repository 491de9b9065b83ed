"""The built-in ``numpy`` backend: the shared models in pure NumPy, trained with SGD or Adam.

It registers through the same hook as any plugin, so fedplug-core alone is a
working product and the core's tests need no ML framework. It is also the reference:
``ReferenceOptimizer`` defines the optimiser every backend implements, and the
conformance suite compares every backend's predictions and training with this backend's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedplug import Backend, Config, DataSpec, Framework, Implementation, Scalar, Weights, hookimpl
from fedplug.toolkit import (
    ADAM_BETAS,
    ADAM_EPS,
    BN_EPS,
    BN_MOMENTUM,
    LENET_CONV,
    NORM_ARRAYS,
    NORM_PREFIX,
    TrainSettings,
    canonical_shapes,
    eval_chunks,
    metrics,
)


class Dense:
    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.params = [weight, bias]

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        out: np.ndarray = x @ self.params[0].T + self.params[1]
        return out

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        weight = self.params[0]
        return grad @ weight, [grad.T @ self.x, grad.sum(axis=0)]


class Conv:
    """Valid 2-D convolution (cross-correlation, as in every framework)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None) -> None:
        self.params = [weight] if bias is None else [weight, bias]  # lenet-bn's convs have no bias

    def forward(self, x: np.ndarray) -> np.ndarray:
        k = self.params[0].shape[-1]
        self.windows = sliding_window_view(x, (k, k), axis=(2, 3))
        out: np.ndarray = np.einsum("nchwij,ocij->nohw", self.windows, self.params[0], optimize=True)
        if len(self.params) > 1:
            out += self.params[1][None, :, None, None]
        return out

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        weight = self.params[0]
        k = weight.shape[-1]
        d_weight = np.einsum("nohw,nchwij->ocij", grad, self.windows, optimize=True)
        padded = np.pad(grad, ((0, 0), (0, 0), (k - 1, k - 1), (k - 1, k - 1)))
        grad_windows = sliding_window_view(padded, (k, k), axis=(2, 3))
        flipped = weight[:, :, ::-1, ::-1]
        d_x = np.einsum("nohwij,ocij->nchw", grad_windows, flipped, optimize=True)
        return d_x, [d_weight, grad.sum(axis=(0, 2, 3))][: len(self.params)]


class Pool:
    """2x2 max or average pooling with stride 2 (an odd last row/column is dropped)."""

    params: ClassVar[list[np.ndarray]] = []  # no weights

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def forward(self, x: np.ndarray) -> np.ndarray:
        n, c, h, w = x.shape
        self.shape = x.shape
        blocks = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2)
        if self.kind == "avg":
            mean: np.ndarray = blocks.mean(axis=(3, 5))
            return mean
        out: np.ndarray = blocks.max(axis=(3, 5))
        self.mask = blocks == out[:, :, :, None, :, None]
        return out

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        spread = grad[:, :, :, None, :, None]
        if self.kind == "avg":
            blocks = np.broadcast_to(spread / 4.0, (*grad.shape[:3], 2, grad.shape[3], 2))
        else:
            blocks = self.mask * spread / self.mask.sum(axis=(3, 5), keepdims=True)
        n, c, h, w = self.shape
        d_x = np.zeros(self.shape, dtype=grad.dtype)
        d_x[:, :, : h // 2 * 2, : w // 2 * 2] = blocks.reshape(n, c, h // 2 * 2, w // 2 * 2)
        return d_x, []


class BatchNorm:
    """Batch normalisation of a conv's channels (``torch.nn.BatchNorm2d``): in training, each channel is normalised
    by the batch's mean and (biased) variance over ``(N, H, W)`` and the running statistics move toward them by
    ``BN_MOMENTUM`` (the variance unbiased); in evaluation, by the running statistics. ``scale * x_hat + shift``."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray, mean: np.ndarray, var: np.ndarray) -> None:
        self.params = [scale, shift]
        self.running = (mean, var)
        self.training = False

    def forward(self, x: np.ndarray) -> np.ndarray:
        mean, var = self.running
        if self.training:
            count = x.size // x.shape[1]
            mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
            for stat, batch in zip(self.running, (mean, var * (count / max(count - 1, 1))), strict=True):
                stat *= np.float32(1 - BN_MOMENTUM)  # in place: the model's weights are these arrays
                stat += np.float32(BN_MOMENTUM) * batch.astype(np.float32)
        self.inv_std = (1.0 / np.sqrt(var + np.float32(BN_EPS))).astype(np.float32)
        self.x_hat = (x - mean[None, :, None, None]) * self.inv_std[None, :, None, None]
        scale, shift = self.params
        out: np.ndarray = self.x_hat * scale[None, :, None, None] + shift[None, :, None, None]
        return out

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        axes = (0, 2, 3)
        d_scale, d_shift = (grad * self.x_hat).sum(axis=axes), grad.sum(axis=axes)
        d_x_hat = grad * self.params[0][None, :, None, None]
        count = grad.size // grad.shape[1]
        d_x = (
            d_x_hat
            - d_x_hat.sum(axis=axes, keepdims=True) / count
            - self.x_hat * (d_x_hat * self.x_hat).sum(axis=axes, keepdims=True) / count
        ) * self.inv_std[None, :, None, None]
        return d_x, [d_scale, d_shift]


class Relu:
    params: ClassVar[list[np.ndarray]] = []  # no weights

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.positive = x > 0
        return x * self.positive

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return grad * self.positive, []


class Flatten:
    params: ClassVar[list[np.ndarray]] = []  # no weights

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def backward(self, grad: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        return grad.reshape(self.shape), []


class NumpyModel:
    """A sequence of layers; ``weights`` holds the canonical arrays the layers use (and ``lenet-bn``'s updates)."""

    def __init__(self, name: str, weights: Weights, pool: str) -> None:
        self.name = name
        self.weights = weights
        pairs = [
            (weights[f"layers.{i}.weight"], weights.get(f"layers.{i}.bias"))
            for i in range(len(weights))
            if f"layers.{i}.weight" in weights
        ]
        self.layers: list[Any] = []
        num_convs = len(LENET_CONV) if name.startswith("lenet") else 0
        for i, (weight, bias) in enumerate(pairs):
            if i < num_convs:
                self.layers.append(Conv(weight, bias))
                if name == "lenet-bn":
                    self.layers.append(BatchNorm(*(weights[f"{NORM_PREFIX}{i}.{array}"] for array in NORM_ARRAYS)))
                self.layers += [Relu(), Pool(pool)]
                continue
            if i == num_convs:
                self.layers.append(Flatten())
            self.layers.append(Dense(weight, bias))  # type: ignore[arg-type]  # dense layers have one
            if i < len(pairs) - 1:
                self.layers.append(Relu())
        self.params = [param for layer in self.layers for param in layer.params]
        """The trained arrays, in the order of ``backward``'s gradients (the running statistics are not)."""

    def train_mode(self, training: bool) -> None:
        """Batch statistics (training) or running ones (evaluation) in the batch normalisation layers."""
        for layer in self.layers:
            if isinstance(layer, BatchNorm):
                layer.training = training

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, grad: np.ndarray) -> list[np.ndarray]:
        grads: list[np.ndarray] = []
        for layer in reversed(self.layers):
            grad, layer_grads = layer.backward(grad)
            grads = layer_grads + grads
        return grads


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(y)), y].mean()
    grad = np.exp(log_probs)
    grad[np.arange(len(y)), y] -= 1.0
    return float(loss), grad / len(y)


class ReferenceOptimizer:
    """The optimiser of one ``train`` call, exactly as the contract defines it (``toolkit.TrainSettings``).

    Every gradient ``g`` of a parameter ``w`` first gets ``weight_decay * w`` (coupled L2
    decay) and FedProx's ``proximal_mu * (w - w_start)``; then

    - ``sgd``: ``v = momentum * v + g``; ``w -= lr * v`` (``torch.optim.SGD``);
    - ``adam``: ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
      ``w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, ``t`` counting this
      call's steps from 1 (``torch.optim.Adam``, betas 0.9/0.999, eps 1e-8).

    State starts from zero at construction, once per ``train`` call. Arithmetic is float32,
    like the frameworks' (Python scalars do not promote float32 arrays).
    """

    def __init__(self, settings: TrainSettings, params: list[np.ndarray]) -> None:
        self.settings = settings
        self.start = [p.copy() for p in params] if settings.proximal_mu > 0 else []
        self.first = [np.zeros_like(p) for p in params]
        self.second = [np.zeros_like(p) for p in params] if settings.optimizer == "adam" else []
        self.steps = 0

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        """Update ``params`` in place from their mini-batch mean gradients ``grads``."""
        s = self.settings
        self.steps += 1
        beta1, beta2 = ADAM_BETAS
        for i, (param, g) in enumerate(zip(params, grads, strict=True)):
            g = g.astype(param.dtype)
            if s.weight_decay > 0:
                g = g + s.weight_decay * param
            if s.proximal_mu > 0:
                g = g + s.proximal_mu * (param - self.start[i])
            if s.optimizer == "sgd":
                self.first[i] = s.momentum * self.first[i] + g
                param -= s.lr * self.first[i]
                continue
            self.first[i] = beta1 * self.first[i] + (1 - beta1) * g
            self.second[i] = beta2 * self.second[i] + (1 - beta2) * g * g
            denominator = np.sqrt(self.second[i]) / math.sqrt(1 - beta2**self.steps) + ADAM_EPS
            param -= s.lr / (1 - beta1**self.steps) * self.first[i] / denominator


class NumpyBackend(Backend):
    name = "numpy"
    description = "Built-in pure-NumPy MLP, LeNet and LeNet-BN with SGD or Adam: no framework needed"
    framework = Framework("numpy", "numpy")
    implementation = "fedplug.numpy_backend:NumpyImplementation"
    models = ("mlp", "lenet", "lenet-bn")
    defaults: ClassVar[Mapping[str, Scalar]] = {"num-server-rounds": 5}  # the rest: the core's
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".npz"


class NumpyImplementation(Implementation):
    """The reference: ``ReferenceOptimizer`` (SGD or Adam, weight decay, FedProx), in the core's example order."""

    def build_model(self, model: str, spec: DataSpec, config: Config) -> NumpyModel:
        rng = np.random.default_rng(int(config.get("seed", 0)))
        weights: Weights = {}
        for key, shape in canonical_shapes(model, spec, config).items():
            if key.startswith(NORM_PREFIX):  # batch normalisation: scale and variance 1, shift and mean 0
                fill = 1.0 if key.endswith((".weight", ".running_var")) else 0.0
                weights[key] = np.full(shape, fill, dtype=np.float32)
            elif key.endswith(".weight"):
                fan_in = int(np.prod(shape[1:]))
                bound = 1.0 / np.sqrt(fan_in)  # PyTorch's default init range
                weights[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
            else:
                weights[key] = np.zeros(shape, dtype=np.float32)
        return NumpyModel(model, weights, str(config.get("pool", "max")))

    def get_weights(self, model: NumpyModel) -> Weights:
        return {key: value.copy() for key, value in model.weights.items()}

    def set_weights(self, model: NumpyModel, weights: Weights) -> None:
        for key, value in model.weights.items():
            value[...] = weights[key]

    def train(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        settings = TrainSettings.from_config(config)
        params = model.params
        optimizer = ReferenceOptimizer(settings, params)
        x = x.reshape(len(x), -1) if model.name == "mlp" else x
        loss_sum, correct = 0.0, 0
        model.train_mode(True)
        try:
            for idx in settings.batches(len(y)):
                logits = model.forward(x[idx])
                loss, grad = softmax_cross_entropy(logits, y[idx])
                loss_sum += loss * len(idx)
                correct += int((logits.argmax(axis=1) == y[idx]).sum())
                optimizer.step(params, model.backward(grad))
        finally:
            model.train_mode(False)
        return metrics(loss_sum, correct, len(y) * settings.epochs, len(y))

    def evaluate(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        logits = self.predict(model, x)
        loss, _ = softmax_cross_entropy(logits, y)
        return metrics(loss * len(y), (logits.argmax(axis=1) == y).sum(), len(y))

    def predict(self, model: NumpyModel, x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1) if model.name == "mlp" else x
        return np.concatenate([model.forward(x[chunk]) for chunk in eval_chunks(len(x))])

    def save(self, model: NumpyModel, path: Path) -> None:
        with open(path, "wb") as file:
            arrays: dict[str, Any] = dict(model.weights)
            np.savez(file, **arrays)

    def load(self, model: NumpyModel, path: Path) -> NumpyModel:
        with np.load(path, allow_pickle=False) as saved:
            self.set_weights(model, {key: saved[key] for key in saved.files})
        return model


@hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(NumpyBackend())
