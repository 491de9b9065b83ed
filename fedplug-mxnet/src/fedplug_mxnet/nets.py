"""The shared models as hybridized Gluon networks: build, weights in and out, files."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from fedplug import Config, DataSpec
from fedplug.toolkit import LENET_CONV, LENET_DENSE, canonical_shapes, hidden_dims, lenet_flat_features
from fedplug_mxnet.framework import import_mxnet

mx = import_mxnet()
nn = mx.gluon.nn


@dataclass
class GluonModel:
    """A hybridized network and its parameters in canonical order."""

    net: Any  # a hybridized gluon.nn.HybridSequential (MXNet has no type information)
    params: dict[str, Any]
    """Canonical name -> Gluon parameter."""
    ctx: Any


def device() -> Any:
    """The first GPU if MXNet sees one, else the CPU."""
    return mx.gpu() if mx.context.num_gpus() > 0 else mx.cpu()


def dense_stack(net: Any, widths: tuple[int, ...]) -> None:
    """Append Dense layers ``widths[0] -> ... -> widths[-1]``, ReLU on all but the last.

    Gluon's Dense flattens its input in (C, H, W) order, the canonical one.
    """
    pairs = list(pairwise(widths))
    for i, (inp, out) in enumerate(pairs):
        net.add(nn.Dense(out, activation="relu" if i < len(pairs) - 1 else None, in_units=inp))


def build_net(model: str, spec: DataSpec, config: Config) -> Any:
    """The Gluon network of shared model ``mlp`` or ``lenet`` (layers only, not initialized).

    Input sizes are given explicitly, so parameters exist right after ``initialize``
    without the dummy forward pass the quickstart makes.
    """
    net = nn.HybridSequential()
    if model == "mlp":
        dense_stack(net, (spec.num_features, *hidden_dims(config), spec.num_classes))
        return net
    pool = nn.MaxPool2D if config.get("pool", "max") == "max" else nn.AvgPool2D
    in_channels = spec.channels
    for channels, kernel in LENET_CONV:
        net.add(nn.Conv2D(channels, kernel, activation="relu", in_channels=in_channels))
        net.add(pool(pool_size=2, strides=2))
        in_channels = channels
    dense_stack(net, (lenet_flat_features(spec), *LENET_DENSE, spec.num_classes))
    return net


def build_model(model: str, spec: DataSpec, config: Config) -> GluonModel:
    """Build, initialize (Gluon's default uniform(-0.07, 0.07), zero biases) and hybridize."""
    shapes = canonical_shapes(model, spec, config)
    net = build_net(model, spec, config)
    ctx = device()
    mx.random.seed(int(config.get("seed", 0)))
    net.initialize(ctx=ctx)
    net.hybridize()
    params = dict(zip(shapes, net.collect_params().values(), strict=True))
    for key, param in params.items():
        assert param.shape == shapes[key], f"{key}: Gluon {param.shape} != canonical {shapes[key]}"
    return GluonModel(net, params, ctx)
