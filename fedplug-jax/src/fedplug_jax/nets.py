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
from fedplug.toolkit import (
    BN_EPS,
    BN_MOMENTUM,
    LENET_CONV,
    LENET_DENSE,
    check_custom_model,
    hidden_dims,
    lenet_flat_features,
)
from fedplug_jax.framework import jax, jnp, nnx

POOLS = {"avg": nnx.avg_pool, "max": nnx.max_pool}
Layer = nnx.Linear | nnx.Conv


def dense_stack(layers: Sequence[Layer], x: jax.Array) -> jax.Array:
    """Dense layers with ReLU between them, none after the last."""
    for layer in layers[:-1]:
        x = nnx.relu(layer(x))
    return layers[-1](x)


class Norm(nnx.Module):
    """``lenet-bn``'s batch normalisation of a conv's channels (NHWC), as ``fedplug.numpy_backend.BatchNorm``.

    Not ``nnx.BatchNorm``: its running variance takes the batch's biased variance, the reference the unbiased one,
    and the statistics here leave out a padded batch's padding (``mask``). ``model.eval()`` sets
    ``use_running_average``, as it does for Flax's own.
    """

    def __init__(self, channels: int) -> None:
        self.scale = nnx.Param(jnp.ones(channels))
        self.bias = nnx.Param(jnp.zeros(channels))
        self.mean = nnx.BatchStat(jnp.zeros(channels))
        self.var = nnx.BatchStat(jnp.ones(channels))
        self.use_running_average = True  # evaluation, unless the backend's train sets model.train()

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            weight = jnp.ones(x.shape[:1]) if mask is None else mask
            count = weight.sum() * x.shape[1] * x.shape[2]
            weight = weight[:, None, None, None]
            mean = (x * weight).sum(axis=(0, 1, 2)) / count
            var = (jnp.square(x - mean) * weight).sum(axis=(0, 1, 2)) / count
            momentum = jnp.float32(BN_MOMENTUM)
            self.mean[...] = (1 - momentum) * self.mean[...] + momentum * mean
            self.var[...] = (1 - momentum) * self.var[...] + momentum * var * count / jnp.maximum(count - 1, 1)
        return (x - mean) / jnp.sqrt(var + jnp.float32(BN_EPS)) * self.scale[...] + self.bias[...]


class Network(nnx.Module):
    """A fedplug network: ``layers`` holds the layers with parameters, in canonical order; ``norms`` the
    normalisation layers of ``lenet-bn`` (none elsewhere). ``mask`` marks a padded batch's real rows."""

    layers: nnx.List[Layer]
    norms: nnx.List[Norm]

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        raise NotImplementedError


class Mlp(Network):
    """Dense layers of the given widths over the flattened image."""

    def __init__(self, widths: tuple[int, ...], rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(inp, out, rngs=rngs) for inp, out in pairwise(widths)])
        self.norms = nnx.List([])

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return dense_stack(self.layers, x.reshape(x.shape[0], -1))


class ConvNet(Network):
    """Two 5x5 conv -> ReLU -> 2x2 pool blocks, then dense layers: LeNet or the quickstart CNN."""

    def __init__(
        self, spec: DataSpec, padding: str, pool: str, flat_features: int, rngs: nnx.Rngs, norm: bool = False
    ) -> None:
        layers: list[Layer] = []
        in_ch = spec.channels
        for out_ch, kernel in LENET_CONV:  # lenet-bn: no conv bias, the normalisation's shift replaces it
            layers.append(nnx.Conv(in_ch, out_ch, (kernel, kernel), padding=padding, use_bias=not norm, rngs=rngs))
            in_ch = out_ch
        self.norms = nnx.List([Norm(out_ch) for out_ch, _ in LENET_CONV] if norm else [])
        widths = (flat_features, *LENET_DENSE, spec.num_classes)
        layers += [nnx.Linear(inp, out, rngs=rngs) for inp, out in pairwise(widths)]
        self.layers = nnx.List(layers)
        self.pool = pool

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = jnp.transpose(x, (0, 2, 3, 1))
        pool = POOLS[self.pool]
        for i, conv in enumerate(self.layers[: len(LENET_CONV)]):
            x = conv(x)
            if self.norms:
                x = self.norms[i](x, mask)
            x = pool(nnx.relu(x), window_shape=(2, 2), strides=(2, 2))  # type: ignore[no-untyped-call]
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
    if model in ("lenet", "lenet-bn"):
        pool = str(config.get("pool", "max"))
        return ConvNet(spec, "VALID", pool, lenet_flat_features(spec), rngs, norm=model == "lenet-bn")
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
