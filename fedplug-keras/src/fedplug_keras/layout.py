"""Keras weights <-> the canonical layout.

Keras keeps dense kernels ``(in, out)`` and conv kernels ``(kh, kw, in, out)``, and
its channels-last ``Flatten`` orders features ``(H, W, C)``. The canonical layout is
dense ``(out, in)``, conv ``(out, in, kh, kw)`` and flat features ``(C, H, W)``: the
first dense layer after a feature map gets its input rows permuted at this boundary,
so the Keras model itself stays the plain quickstart architecture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from fedplug.backend import Weights

FeatureMap = tuple[int, int, int] | None
"""``(H, W, C)`` of the feature map a dense layer's input was flattened from, or None."""


def parametrised_layers(net: Any) -> Iterator[tuple[Any, FeatureMap]]:
    """The layers holding weights, in order, each with the feature map it flattens (if any)."""
    feature_map: FeatureMap = None
    for layer in net.layers:
        if layer.weights:
            yield layer, feature_map
            feature_map = None
        shape = tuple(layer.output.shape[1:])
        if len(shape) == 3:
            feature_map = shape  # type: ignore[assignment]


def to_canonical(kernel: np.ndarray, feature_map: FeatureMap) -> np.ndarray:
    """A Keras kernel in the canonical layout."""
    if kernel.ndim == 4:
        return kernel.transpose(3, 2, 0, 1)
    if feature_map is not None:
        return kernel.reshape(*feature_map, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)
    return kernel.T


def from_canonical(weight: np.ndarray, feature_map: FeatureMap) -> np.ndarray:
    """A canonical weight as a Keras kernel."""
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    if feature_map is not None:
        height, width, channels = feature_map
        return weight.reshape(-1, channels, height, width).transpose(2, 3, 1, 0).reshape(height * width * channels, -1)
    return weight.T


def get_weights(net: Any) -> Weights:
    """The model's weights in the canonical layout, as fresh float32 arrays."""
    weights: Weights = {}
    for i, (layer, feature_map) in enumerate(parametrised_layers(net)):
        kernel, bias = layer.get_weights()
        weights[f"layers.{i}.weight"] = np.ascontiguousarray(to_canonical(kernel, feature_map), dtype=np.float32)
        weights[f"layers.{i}.bias"] = np.array(bias, dtype=np.float32)
    return weights


def set_weights(net: Any, weights: Weights) -> None:
    """Load canonical weights; Keras checks every shape."""
    for i, (layer, feature_map) in enumerate(parametrised_layers(net)):
        kernel = from_canonical(np.asarray(weights[f"layers.{i}.weight"]), feature_map)
        layer.set_weights([kernel, np.asarray(weights[f"layers.{i}.bias"])])
