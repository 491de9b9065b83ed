"""fedplug-torch: a custom model (``--model module:factory``) federated from the user's folder on colour images."""

from __future__ import annotations

from pathlib import Path

from fedplug.testing.custom_models import check_custom_model_federation

MODULE = """
import torch
from torch import nn


def SmallCnn(spec, config):
    channels, height, width = spec.input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (height // 4) * (width // 4), spec.num_classes),
    )


def WrongFramework(spec, config):
    return "a string"
"""
WEIGHT_NAMES = ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]
"""PyTorch's own ``state_dict`` names, in a stable order."""


def test_custom_cnn_federated_from_its_folder_on_colour_images(tmp_path: Path) -> None:
    """The module's CNN: wrong type refused in one line; 2 nodes, 2 rounds on 32x32 RGB: it learns, saves, loads."""
    check_custom_model_federation(
        "torch", MODULE, WEIGHT_NAMES, "lr=0.02 batch-size=16 local-epochs=2", "not a torch.nn.Module", tmp_path
    )


def test_info_says_what_a_factory_receives_and_returns() -> None:
    from fedplug.testing.runs import cli

    done = cli("info", "torch", env={"FEDPLUG_PLUGINS": "torch", "COLUMNS": "400"})
    assert done.returncode == 0
    assert (
        "Factory(spec, config) receives spec.input_shape (C, H, W), spec.num_classes and the run config" in done.stdout
    )
    assert "must return a torch.nn.Module taking float32 images (N, C, H, W)" in done.stdout
