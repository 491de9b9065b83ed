"""The model state: canonical weights across the fedplug boundary, Flax msgpack on disk.

Flax stores dense kernels ``(in, out)`` and conv kernels ``(kh, kw, in, out)``; the
canonical layout is ``(out, in)`` and ``(out, in, kh, kw)``. Biases agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedplug.backend import Weights
from fedplug_jax.framework import jax, nnx, serialization
from fedplug_jax.nets import Network

TO_CANONICAL = {1: (0,), 2: (1, 0), 4: (3, 2, 0, 1)}
"""Axis order, by rank, that takes a Flax parameter to the canonical layout."""
FROM_CANONICAL = {1: (0,), 2: (1, 0), 4: (2, 3, 1, 0)}


def parameters(model: Network) -> list[tuple[str, nnx.Param[jax.Array]]]:
    """``(canonical name, Flax parameter)`` pairs in canonical order."""
    return [
        (f"layers.{i}.{part}", variable)
        for i, layer in enumerate(model.layers)
        for part, variable in (("weight", layer.kernel), ("bias", layer.bias))
    ]


def canonical_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[axis] for axis in TO_CANONICAL[len(shape)])


def get_weights(model: Network) -> Weights:
    """Canonical weights as fresh numpy arrays, fetched in one device transfer."""
    named = parameters(model)
    arrays = jax.device_get([variable[...] for _, variable in named])
    return {
        name: np.array(array.transpose(TO_CANONICAL[array.ndim]), order="C") for (name, _), array in zip(named, arrays)
    }


def set_weights(model: Network, weights: Weights) -> None:
    """Load canonical weights into ``model``, sent to the device in one transfer."""
    named = parameters(model)
    arrays = []
    for name, variable in named:
        array = np.asarray(weights[name], dtype=np.float32)
        if array.shape != canonical_shape(variable.shape):
            raise ValueError(f"{name} must have shape {canonical_shape(variable.shape)}, got {array.shape}")
        arrays.append(array.transpose(FROM_CANONICAL[array.ndim]))
    for (_, variable), value in zip(named, jax.device_put(arrays)):
        variable[...] = value


def save(model: Network, path: Path) -> None:
    """Write the model's state, in Flax's own layout, as Flax msgpack."""
    path.write_bytes(serialization.to_bytes(nnx.to_pure_dict(nnx.state(model))))


def load(model: Network, path: Path) -> Network:
    """Read a file written by ``save`` into ``model`` (msgpack, no pickle); return it."""
    target = nnx.to_pure_dict(nnx.state(model))
    restored = serialization.from_bytes(target, path.read_bytes())
    if jax.tree.map(np.shape, restored) != jax.tree.map(np.shape, target):
        raise ValueError(f"{path} holds a model of another architecture or data shape")
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.device_put(restored))
    nnx.update(model, state)
    return model
