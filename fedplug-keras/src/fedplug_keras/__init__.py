"""fedplug backend ``keras``: Keras 3 on TensorFlow (or JAX / PyTorch), as Flower's quickstart-tensorflow.

This module is the light descriptor: Keras is imported by the implementation
(``fedplug_keras.training``) on first use, after ``KERAS_BACKEND`` is set from the
run config (``framework.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import fedplug
from fedplug import Backend, Config, Framework, Scalar
from fedplug_keras.framework import CONFIG_KEY, DEFAULT_BACKEND, check_choice, check_installed


class KerasBackend(Backend):
    name = "keras"
    description = "Keras 3 on TensorFlow (or JAX/PyTorch): quickstart-tensorflow's CNN with Adam (or SGD)"
    framework = Framework("keras", "keras>=3")
    implementation = "fedplug_keras.training:KerasImplementation"
    models = ("cnn", "mlp", "lenet", "lenet-bn")
    # the Flower TensorFlow quickstart's settings, where they differ from the core's (--preset quickstart)
    quickstart: ClassVar[Mapping[str, Scalar]] = {
        "model": "cnn",
        "optimizer": "adam",
        "lr": 0.001,
        "fraction-train": 0.5,
        "fraction-evaluate": 1.0,
        "num-server-rounds": 3,
    }
    # the quickstart's learns on the embedded digits too (91.9%); half the nodes evaluating and 2 rounds
    # keep it within 30 s on 2 cores (87.8%, docs/performance.md)
    defaults: ClassVar[Mapping[str, Scalar]] = {
        **quickstart,
        "fraction-evaluate": 0.5,
        "num-server-rounds": 2,
        CONFIG_KEY: DEFAULT_BACKEND,
    }
    presets: ClassVar[Mapping[str, Mapping[str, Scalar]]] = {"quickstart": quickstart}
    custom_models = (
        "a keras.Model with a defined input, keras.Input((H, W, C)) (images arrive channels-last, float32 in "
        "[0, 1]; a 1-D input gets flat C*H*W features), returning logits (N, num_classes)"
    )
    quickstart_dataset = "uoft-cs/cifar10"
    file_suffix = ".keras"

    def check_available(self, config: Config | None = None) -> None:
        check_installed(config)  # Keras and a framework for it: the run config's keras.backend, if given
        super().check_available()  # Keras's version

    def check_config(self, config: Config) -> None:
        check_choice(config)

    def environment(self, config: Config) -> dict[str, str]:
        # Flower's simulation imports TensorFlow, and TensorFlow imports Keras, before any
        # backend code runs: the Keras backend must be chosen in the environment first.
        return {"KERAS_BACKEND": check_choice(config)}


@fedplug.hookimpl
def fedplug_register_backends(register: Any) -> None:
    register(KerasBackend())
