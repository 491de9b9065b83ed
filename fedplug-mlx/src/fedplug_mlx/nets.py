"""The shared models in MLX, and their weights in fedplug's canonical layout.

MLX is channels-last: images enter the convolutions as ``(N, H, W, C)`` and conv
weights are ``(out, kh, kw, in)``. Linear weights are already ``(out, in)``. Each
model converts canonical ``(N, C, H, W)`` images to its own input layout once per
call (``native_input``), and LeNet flattens its feature maps in ``(C, H, W)`` order
so that its first dense layer matches the canonical one.
"""

from __future__ import annotations

from itertools import pairwise

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from fedplug.backend import Config, DataSpec, ModelError, Weights
from fedplug.models import LENET_CONV, LENET_DENSE, hidden_dims, lenet_flat_features

POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
CANONICAL_CONV = (0, 3, 1, 2)
"""Axis order taking an MLX conv weight ``(out, kh, kw, in)`` to ``(out, in, kh, kw)``."""
MLX_CONV = (0, 2, 3, 1)
"""The inverse: canonical ``(out, in, kh, kw)`` to MLX ``(out, kh, kw, in)``."""


def dense_stack(widths: tuple[int, ...]) -> list[nn.Linear]:
    return [nn.Linear(inp, out) for inp, out in pairwise(widths)]


def relu_stack(layers: list[nn.Linear], x: mx.array) -> mx.array:
    """Apply dense ``layers`` with ReLU between them and none after the last."""
    for layer in layers[:-1]:
        x = nn.relu(layer(x))
    return layers[-1](x)


class MLP(nn.Module):
    """Dense layers with ReLU between them, as in the MLX quickstart."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = dense_stack(widths)

    @staticmethod
    def native_input(x: np.ndarray) -> mx.array:
        return mx.array(x.reshape(len(x), -1))

    def __call__(self, x: mx.array) -> mx.array:
        return relu_stack(self.layers, x)


class LeNet(nn.Module):
    """LeNet-5: two valid 5x5 conv + ReLU + 2x2 pool blocks, then three dense layers."""

    def __init__(self, spec: DataSpec, pool: str) -> None:
        super().__init__()
        convs, in_ch = [], spec.channels
        for out_ch, kernel in LENET_CONV:
            convs.append(nn.Conv2d(in_ch, out_ch, kernel))
            in_ch = out_ch
        widths = (lenet_flat_features(spec), *LENET_DENSE, spec.num_classes)
        self.layers = [*convs, *dense_stack(widths)]
        self.num_convs = len(convs)
        self.pool = POOLS[pool](kernel_size=2, stride=2)

    @staticmethod
    def native_input(x: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))

    def __call__(self, x: mx.array) -> mx.array:
        for conv in self.layers[: self.num_convs]:
            x = self.pool(nn.relu(conv(x)))
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # flatten in (C, H, W) order
        return relu_stack(self.layers[self.num_convs :], x)


Net = MLP | LeNet


def build(model: str, spec: DataSpec, config: Config) -> Net:
    """Build ``model`` for ``spec``, initialised by MLX's default initialisers from ``config['seed']``."""
    mx.random.seed(int(config.get("seed", 0)))
    if model == "mlp":
        net: Net = MLP((spec.num_features, *hidden_dims(config), spec.num_classes))
    elif model == "lenet":
        pool = str(config.get("pool", "max"))
        if pool not in POOLS:
            raise ModelError(f"pool must be 'max' or 'avg', got '{pool}'")
        net = LeNet(spec, pool)
    else:
        raise ModelError(f"the mlx backend has no model '{model}': use 'mlp' or 'lenet'")
    mx.eval(net.parameters())
    return net


def get_weights(net: Net) -> Weights:
    """The parameters as fresh float32 numpy arrays in the canonical layout."""
    weights: Weights = {}
    for name, value in tree_flatten(net.parameters()):
        array = np.array(value, dtype=np.float32)
        if array.ndim == 4:
            array = np.ascontiguousarray(array.transpose(CANONICAL_CONV))
        weights[name] = array
    return weights


def set_weights(net: Net, weights: Weights) -> None:
    """Load canonical weights; names and shapes must match the model exactly."""
    native = []
    for name, value in weights.items():
        array = np.asarray(value, dtype=np.float32)
        if array.ndim == 4:
            array = array.transpose(MLX_CONV)
        native.append((name, mx.array(array)))
    net.load_weights(native, strict=True)
