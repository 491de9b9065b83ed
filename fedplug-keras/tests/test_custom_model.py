"""fedplug-keras: a custom model (``--model module:factory``) federated from the user's folder on colour images."""

from __future__ import annotations

from pathlib import Path

from fedplug.testing.custom_models import check_custom_model_federation

MODULE = """
import keras


def SmallCnn(spec, config):
    channels, height, width = spec.input_shape
    layers = keras.layers
    return keras.Sequential([
        keras.Input((height, width, channels)),
        layers.Conv2D(8, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dense(spec.num_classes),
    ])


def WrongFramework(spec, config):
    return "a string"
"""
WEIGHT_NAMES = [
    "layers.0.kernel",
    "layers.0.bias",
    "layers.2.kernel",
    "layers.2.bias",
    "layers.5.kernel",
    "layers.5.bias",
]
"""``layers.<i>.<variable>`` in Keras's layouts, in a stable order."""


def test_custom_cnn_federated_from_its_folder_on_colour_images(tmp_path: Path) -> None:
    """The module's CNN: wrong type refused in one line; 2 nodes, 2 rounds on 32x32 RGB: it learns, saves, loads."""
    check_custom_model_federation(
        "keras", MODULE, WEIGHT_NAMES, "lr=0.002 batch-size=16 local-epochs=2", "not a keras.Model", tmp_path
    )
