"""The Flax NNX networks: the JAX quickstart's CNN and the shared MLP and LeNet.

Every network takes images ``(N, C, H, W)`` as fedplug hands them out, keeps the
layers that hold parameters in ``layers`` (canonical order) and returns logits.
Convolutions run channels-last (NHWC, Flax's layout); the feature maps go back to
channels-first right before flattening, so dense weights see the canonical
``(C, H, W)`` feature order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

from fedplug import Config, DataSpec, ModelError
from fedplug.toolkit import LENET_CONV, LENET_DENSE, check_custom_model, hidden_dims, lenet_flat_features
from fedplug_jax.framework import jax, jnp, nnx

POOLS = {"avg": nnx.avg_pool, "max": nnx.max_pool}
Layer = nnx.Linear | nnx.Conv


def dense_stack(layers: Sequence[Layer], x: jax.Array) -> jax.Array:
    """Dense layers with ReLU between them, none after the last."""
    for layer in layers[:-1]:
        x = nnx.relu(layer(x))
    return layers[-1](x)


class Network(nnx.Module):
    """A fedplug network: ``layers`` holds the layers with parameters, in canonical order."""

    layers: nnx.List[Layer]


class Mlp(Network):
    """Dense layers of the given widths over the flattened image."""

    def __init__(self, widths: tuple[int, ...], rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(inp, out, rngs=rngs) for inp, out in pairwise(widths)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense_stack(self.layers, x.reshape(x.shape[0], -1))


class ConvNet(Network):
    """Two 5x5 conv -> ReLU -> 2x2 pool blocks, then dense layers: LeNet or the quickstart CNN."""

    def __init__(self, spec: DataSpec, padding: str, pool: str, flat_features: int, rngs: nnx.Rngs) -> None:
        layers: list[Layer] = []
        in_ch = spec.channels
        for out_ch, kernel in LENET_CONV:
            layers.append(nnx.Conv(in_ch, out_ch, (kernel, kernel), padding=padding, rngs=rngs))
            in_ch = out_ch
        widths = (flat_features, *LENET_DENSE, spec.num_classes)
        layers += [nnx.Linear(inp, out, rngs=rngs) for inp, out in pairwise(widths)]
        self.layers = nnx.List(layers)
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.transpose(x, (0, 2, 3, 1))
        pool = POOLS[self.pool]
        for conv in self.layers[: len(LENET_CONV)]:
            x = pool(nnx.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))  # type: ignore[no-untyped-call]
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        return dense_stack(self.layers[len(LENET_CONV) :], x)


def cnn_flat_features(spec: DataSpec) -> int:
    """Features after the quickstart CNN's two 'SAME' convs and 2x2 pools."""
    _, height, width = spec.input_shape
    if height < 4 or width < 4:
        raise ModelError(f"cnn needs images of at least 4x4, got {spec.input_shape[1:]}")
    return LENET_CONV[-1][0] * (height // 4) * (width // 4)


def build(model: str, spec: DataSpec, config: Config) -> Network:
    """Build ``model`` for ``spec`` with weights drawn from ``nnx.Rngs(config['seed'])``."""
    rngs = nnx.Rngs(int(config.get("seed", 0)))
    if model == "mlp":
        return Mlp((spec.num_features, *hidden_dims(config), spec.num_classes), rngs)
    if model == "lenet":
        pool = str(config.get("pool", "max"))
        return ConvNet(spec, "VALID", pool, lenet_flat_features(spec), rngs)
    # "cnn", the quickstart's Flax CNN: nn.Conv's default 'SAME' padding and average pooling
    return ConvNet(spec, "SAME", "avg", cnn_flat_features(spec), rngs)


NATIVE = (nnx.Param, nnx.BatchStat)
"""The variables of a custom model that travel: parameters and batch statistics."""


def build_custom(make: Callable[[], Any], config: Config) -> nnx.Module:
    """The user's Flax NNX module (its weights drawn from ``nnx.Rngs(config['seed'])`` by the factory)."""
    return check_custom_model(make(), nnx.Module, "a flax.nnx.Module", config)


def native_paths(net: nnx.Module) -> list[tuple[str, tuple[Any, ...]]]:
    """``(name, path)`` of the parameters and batch statistics, in Flax's order; names join the path with dots."""
    flat: list[tuple[str, tuple[Any, ...]]] = []

    def walk(tree: Any, path: tuple[Any, ...]) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, (*path, key))
        else:
            flat.append((".".join(str(part) for part in path), path))

    walk(nnx.to_pure_dict(nnx.state(net, NATIVE)), ())
    return flat
