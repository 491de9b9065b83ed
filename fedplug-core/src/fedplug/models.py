"""The shared models every backend builds, described by their canonical weight shapes."""

from __future__ import annotations

from itertools import pairwise

from fedplug.backend import Config, DataSpec, ModelError

LENET_CONV = ((6, 5), (16, 5))
"""LeNet's conv layers as ``(out_channels, kernel)``; each is followed by a 2x2 pool."""
LENET_DENSE = (120, 84)


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
    """Canonical ``name -> shape`` of the shared model ``mlp`` or ``lenet``."""
    shapes: list[tuple[int, ...]] = []
    if model == "mlp":
        widths = (spec.num_features, *hidden_dims(config), spec.num_classes)
        shapes = [(out, inp) for inp, out in pairwise(widths)]
    elif model == "lenet":
        in_ch = spec.channels
        for out_ch, kernel in LENET_CONV:
            shapes.append((out_ch, in_ch, kernel, kernel))
            in_ch = out_ch
        widths = (lenet_flat_features(spec), *LENET_DENSE, spec.num_classes)
        shapes += [(out, inp) for inp, out in pairwise(widths)]
    else:
        raise ModelError(f"unknown shared model '{model}': use 'mlp' or 'lenet'")
    named: dict[str, tuple[int, ...]] = {}
    for i, shape in enumerate(shapes):
        named[f"layers.{i}.weight"] = shape
        named[f"layers.{i}.bias"] = (shape[0],)
    return named
