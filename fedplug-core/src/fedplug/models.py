"""The shared models every backend builds, described by their canonical weight shapes."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

from fedplug.backend import Config, DataSpec, ModelError

LENET_CONV = ((6, 5), (16, 5))
"""LeNet's conv layers as ``(out_channels, kernel)``; each is followed by a 2x2 pool."""
LENET_DENSE = (120, 84)
SHARED_MODELS = ("mlp", "lenet", "lenet-bn")
"""The shared models: every backend's layout of them maps to the canonical names of ``canonical_shapes``."""
NORMALISED_MODELS = ("lenet-bn",)
"""The shared models with normalisation layers (``fedbn`` keeps them on each node)."""
NORM_PREFIX = "norm."
"""Canonical names of normalisation arrays begin with it: ``norm.<i>.weight``/``bias`` (the affine scale and
shift), ``norm.<i>.running_mean``/``running_var`` (the statistics evaluation uses), for the ``i``-th conv."""
NORM_ARRAYS = ("weight", "bias", "running_mean", "running_var")
"""A normalisation layer's arrays, in canonical order."""
BN_MOMENTUM = 0.1
"""Batch normalisation's update of its running statistics in training: ``r <- (1 - m) r + m * batch``, the
batch's variance unbiased (PyTorch's ``BatchNorm2d`` convention; Flax and Keras write ``1 - m`` as momentum)."""
BN_EPS = 1e-5


def norm_keys(names: Iterable[str]) -> list[str]:
    """The names of normalisation arrays (``NORM_PREFIX``) among a model's canonical weight names."""
    return [name for name in names if name.startswith(NORM_PREFIX)]


def hidden_dims(config: Config) -> tuple[int, ...]:
    """Parse ``hidden-dims`` (e.g. ``"256,64"``) into layer widths."""
    text = str(config.get("hidden-dims", "128"))
    try:
        dims = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise ModelError(f"hidden-dims must list positive integers like '128,64', got '{text}'")
    return dims


def lenet_flat_features(spec: DataSpec) -> int:
    """Features after LeNet's two valid 5x5 convs and 2x2 pools (channels-first order)."""
    _, height, width = spec.input_shape
    for _, kernel in LENET_CONV:
        height, width = (height - kernel + 1) // 2, (width - kernel + 1) // 2
    if height < 1 or width < 1:
        raise ModelError(f"lenet needs images of at least 16x16, got {spec.input_shape[1:]}")
    return LENET_CONV[-1][0] * height * width


def canonical_shapes(model: str, spec: DataSpec, config: Config) -> dict[str, tuple[int, ...]]:
    """Canonical ``name -> shape`` of the shared model ``mlp``, ``lenet`` or ``lenet-bn``.

    ``lenet-bn`` is ``lenet`` with batch normalisation after each conv (before its ReLU and pool): its
    normalisation arrays come first (``norm.0.*``, ``norm.1.*``, ``NORM_ARRAYS`` each), then ``lenet``'s
    ``layers.*``, so that the head (the last layer's weight and bias) stays the last two arrays. Its convs
    have no bias: the normalisation's shift replaces it (a bias there has a gradient of exactly zero, which
    Adam would turn into steps of rounding noise).
    """
    shapes: list[tuple[int, ...]] = []
    named: dict[str, tuple[int, ...]] = {}
    if model == "mlp":
        widths = (spec.num_features, *hidden_dims(config), spec.num_classes)
        shapes = [(out, inp) for inp, out in pairwise(widths)]
    elif model in ("lenet", "lenet-bn"):
        if model == "lenet-bn":
            for i, (out_ch, _) in enumerate(LENET_CONV):
                named.update({f"{NORM_PREFIX}{i}.{array}": (out_ch,) for array in NORM_ARRAYS})
        in_ch = spec.channels
        for out_ch, kernel in LENET_CONV:
            shapes.append((out_ch, in_ch, kernel, kernel))
            in_ch = out_ch
        widths = (lenet_flat_features(spec), *LENET_DENSE, spec.num_classes)
        shapes += [(out, inp) for inp, out in pairwise(widths)]
    else:
        raise ModelError(f"unknown shared model '{model}': use one of {', '.join(SHARED_MODELS)}")
    for i, shape in enumerate(shapes):
        named[f"layers.{i}.weight"] = shape
        if not (model == "lenet-bn" and len(shape) == 4):
            named[f"layers.{i}.bias"] = (shape[0],)
    return named
