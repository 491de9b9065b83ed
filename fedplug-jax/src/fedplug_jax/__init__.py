"""fedplug backend for JAX with Flax NNX and Optax: the Flower JAX quickstart's CNN.

This module is the light descriptor; the implementation (``fedplug_jax.training``)
imports JAX through ``framework``, once its environment is set, on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import fedplug
from fedplug import Scalar


class JaxBackend(fedplug.Backend):
    name = "jax"
    description = "JAX + Flax NNX + Optax: the Flower JAX quickstart's CNN, MLP and LeNet"
    framework = fedplug.Framework(  # pyproject.toml's bounds; jax brings jaxlib
        "jax", "jax>=0.7.1", also=(("jaxlib", "jaxlib>=0.7.1"), ("flax", "flax>=0.12"), ("optax", "optax>=0.2"))
    )
    implementation = "fedplug_jax.training:JaxImplementation"
    models = ("cnn", "mlp", "lenet", "lenet-bn")
    # the Flower JAX quickstart's settings, where they differ from the core's (--preset quickstart)
    quickstart: ClassVar[Mapping[str, Scalar]] = {
        "model": "cnn",
        "momentum": 0.9,
        "batch-size": 64,
        "num-server-rounds": 5,
        "num-supernodes": 50,
        "fraction-train": 0.4,
        "fraction-evaluate": 0.4,
    }
    # made for 60,000 digits over 50 nodes; on the 12,000 embedded digits, 5 nodes that all train hold
    # enough examples each to learn in 3 rounds (94.9%, docs/performance.md)
    defaults: ClassVar[Mapping[str, Scalar]] = {
        "model": "cnn",
        "momentum": 0.9,
        "batch-size": 64,
        "num-supernodes": 5,
    }
    presets: ClassVar[Mapping[str, Mapping[str, Scalar]]] = {"quickstart": quickstart}
    custom_models = (
        "a flax.nnx.Module (weights drawn from nnx.Rngs(config['seed'])) taking float32 images (N, C, H, W) "
        "in [0, 1] and returning logits (N, num_classes)"
    )
    quickstart_dataset = "ylecun/mnist"
    file_suffix = ".msgpack"


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(JaxBackend())
