"""The shared models in MLX, and their weights in fedplug's canonical layout.

MLX is channels-last: images enter the convolutions as ``(N, H, W, C)`` and conv
weights are ``(out, kh, kw, in)``. Linear weights are already ``(out, in)``. Each
model converts canonical ``(N, C, H, W)`` images to its own input layout once per
call (``native_input``), and LeNet flattens its feature maps in ``(C, H, W)`` order
so that its first dense layer matches the canonical one.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from fedplug import Config, DataSpec
from fedplug.toolkit import (
    BN_EPS,
    BN_MOMENTUM,
    LENET_CONV,
    LENET_DENSE,
    channels_last,
    check_custom_model,
    hidden_dims,
    lenet_flat_features,
)


def dense_stack(widths: tuple[int, ...]) -> list[nn.Linear]:
    return [nn.Linear(inp, out) for inp, out in pairwise(widths)]


def relu_stack(layers: list[nn.Linear], x: mx.array) -> mx.array:
    """Apply dense ``layers`` with ReLU between them and none after the last."""
    for layer in layers[:-1]:
        x = nn.relu(layer(x))
    logits: mx.array = layers[-1](x)
    return logits


class MLP(nn.Module):  # type: ignore[misc]  # mlx.nn is untyped for mypy
    """Dense layers with ReLU between them, as in the MLX quickstart."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = dense_stack(widths)

    @staticmethod
    def native_input(x: np.ndarray) -> mx.array:
        return mx.array(x.reshape(len(x), -1))

    def __call__(self, x: mx.array) -> mx.array:
        return relu_stack(self.layers, x)


class Norm(nn.Module):  # type: ignore[misc]
    """``lenet-bn``'s batch normalisation of a conv's channels (NHWC), as ``fedplug.numpy_backend.BatchNorm``: its
    attributes are the canonical names. Not ``nn.BatchNorm``, whose running variance takes the biased variance."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
        self.freeze(keys=["running_mean", "running_var"])  # weights, not trained by the optimizer

    def __call__(self, x: mx.array) -> mx.array:
        if self.training:
            count = x.size // x.shape[-1]
            mean, var = mx.mean(x, axis=(0, 1, 2)), mx.var(x, axis=(0, 1, 2))
            self.running_mean = (1 - BN_MOMENTUM) * self.running_mean + BN_MOMENTUM * mean
            self.running_var = (1 - BN_MOMENTUM) * self.running_var + BN_MOMENTUM * var * (count / max(count - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
        out: mx.array = (x - mean) * mx.rsqrt(var + BN_EPS) * self.weight + self.bias
        return out


class LeNet(nn.Module):  # type: ignore[misc]
    """LeNet-5: two valid 5x5 conv + ReLU + 2x2 pool blocks, then three dense layers. ``lenet-bn`` (``norm``):
    batch normalisation after each conv, registered first so that its arrays come first, and convs without bias."""

    def __init__(self, spec: DataSpec, pool: str, norm: bool = False) -> None:
        super().__init__()
        if norm:
            self.norm = [Norm(out_ch) for out_ch, _ in LENET_CONV]
        convs, in_ch = [], spec.channels
        for out_ch, kernel in LENET_CONV:
            convs.append(nn.Conv2d(in_ch, out_ch, kernel, bias=not norm))
            in_ch = out_ch
        widths = (lenet_flat_features(spec), *LENET_DENSE, spec.num_classes)
        self.layers = [*convs, *dense_stack(widths)]
        self.num_convs = len(convs)
        self.pool = (nn.AvgPool2d if pool == "avg" else nn.MaxPool2d)(kernel_size=2, stride=2)

    @staticmethod
    def native_input(x: np.ndarray) -> mx.array:
        return native_channels_last(x)

    def __call__(self, x: mx.array) -> mx.array:
        for i, conv in enumerate(self.layers[: self.num_convs]):
            x = conv(x)
            if "norm" in self:
                x = self.norm[i](x)
            x = self.pool(nn.relu(x))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # flatten in (C, H, W) order
        return relu_stack(self.layers[self.num_convs :], x)


Net = MLP | LeNet


def build(model: str, spec: DataSpec, config: Config) -> Net:
    """Build ``model`` for ``spec``, initialised by MLX's default initialisers from ``config['seed']``."""
    mx.random.seed(int(config.get("seed", 0)))
    if model == "mlp":
        net: Net = MLP((spec.num_features, *hidden_dims(config), spec.num_classes))
    else:
        net = LeNet(spec, str(config.get("pool", "max")), norm=model == "lenet-bn")
        net.eval()  # lenet-bn: running statistics, but in the backend's train
    mx.eval(net.parameters())
    return net


def native_channels_last(x: np.ndarray) -> mx.array:
    """Images ``(N, C, H, W)`` as MLX's convolutions take them: ``(N, H, W, C)``."""
    return mx.array(channels_last(x))


def build_custom(make: Callable[[], Any], config: Config) -> nn.Module:
    """The user's ``mlx.nn.Module``, initialised from ``config['seed']``; it takes channels-last images.

    A module that defines ``native_input(x)`` (numpy ``(N, C, H, W)`` -> its input) keeps it.
    """
    mx.random.seed(int(config.get("seed", 0)))
    net = check_custom_model(make(), nn.Module, "an mlx.nn.Module", config)
    if not hasattr(net, "native_input"):
        net.native_input = native_channels_last
    mx.eval(net.parameters())
    return net
