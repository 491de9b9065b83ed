"""fedplug-mlx: a custom model (``--model module:factory``) federated from the user's folder on colour images."""

from __future__ import annotations

from pathlib import Path

from fedplug.testing.custom_models import check_custom_model_federation

MODULE = """
import mlx.nn as nn


class SmallCnn(nn.Module):
    def __init__(self, spec, config):
        super().__init__()
        channels, height, width = spec.input_shape
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.head = nn.Linear(16 * (height // 4) * (width // 4), spec.num_classes)

    def __call__(self, x):
        x = self.pool(nn.relu(self.conv1(x)))
        x = self.pool(nn.relu(self.conv2(x)))
        return self.head(x.reshape(x.shape[0], -1))


def WrongFramework(spec, config):
    return "a string"
"""
WEIGHT_NAMES = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "head.weight", "head.bias"]
"""MLX's own parameter names, in a stable order."""


def test_custom_cnn_federated_from_its_folder_on_colour_images(tmp_path: Path) -> None:
    """The module's CNN: wrong type refused in one line; 2 nodes, 2 rounds on 32x32 RGB: it learns, saves, loads."""
    check_custom_model_federation(
        "mlx", MODULE, WEIGHT_NAMES, "lr=0.1 batch-size=16 local-epochs=2", "not an mlx.nn.Module", tmp_path
    )
