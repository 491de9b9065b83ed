"""fedplug-jax: a custom model (``--model module:factory``) federated from the user's folder on colour images."""

from __future__ import annotations

from pathlib import Path

from fedplug.testing.custom_models import check_custom_model_federation

MODULE = """
import jax.numpy as jnp
from flax import nnx


class SmallCnn(nnx.Module):
    def __init__(self, spec, config):
        channels, height, width = spec.input_shape
        rngs = nnx.Rngs(config["seed"])
        self.conv1 = nnx.Conv(channels, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.head = nnx.Linear(16 * (height // 4) * (width // 4), spec.num_classes, rngs=rngs)

    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1))
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def WrongFramework(spec, config):
    return "a string"
"""
WEIGHT_NAMES = ["conv1.bias", "conv1.kernel", "conv2.bias", "conv2.kernel", "head.bias", "head.kernel"]
"""Flax's parameter paths, in a stable order."""


def test_custom_cnn_federated_from_its_folder_on_colour_images(tmp_path: Path) -> None:
    """The module's CNN: wrong type refused in one line; 2 nodes, 2 rounds on 32x32 RGB: it learns, saves, loads."""
    check_custom_model_federation(
        "jax", MODULE, WEIGHT_NAMES, "lr=0.02 batch-size=16 local-epochs=2", "not a flax.nnx.Module", tmp_path
    )
