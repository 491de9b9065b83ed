"""Choose the framework Keras runs on, then import Keras quietly, once per process.

Keras reads ``KERAS_BACKEND`` when it is first imported and never again, so the
run-config key ``keras.backend`` (not the environment) decides it here, before
that first import. Keras is first imported here and nowhere else, unless something
imported it earlier: TensorFlow imports Keras, and Flower's simulation imports
TensorFlow when it is installed. That case is detected and explained.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from types import ModuleType

from fedplug import BackendUnavailable, Config, ConfigError, Framework
from fedplug.toolkit import cpu_share, held_back_stderr

CONFIG_KEY = "keras.backend"
DEFAULT_BACKEND = "tensorflow"
EXTRAS = {"tensorflow": "tensorflow-cpu", "jax": "jax", "torch": "torch"}
"""Keras backend (also the import name of its framework) -> the fedplug-keras extra installing it."""
INSTALL_HINT = (
    "pip install 'fedplug-keras[tensorflow]' (GPU) or 'fedplug-keras[tensorflow-cpu]' (or the extras [jax], [torch])"
)


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return Framework(module, module).is_installed()


def check_installed(config: Config | None = None) -> None:
    """Raise ``BackendUnavailable`` unless Keras and a framework for it are installed: the run config's
    ``keras.backend`` if ``config`` is given (a name Keras does not know is ``check_choice``'s to refuse), else any."""
    if not is_installed("keras"):
        raise BackendUnavailable(f"backend 'keras' needs Keras 3: {INSTALL_HINT}")
    wanted = str(config.get(CONFIG_KEY, DEFAULT_BACKEND)) if config is not None else ""
    if wanted in EXTRAS and not is_installed(wanted):
        raise BackendUnavailable(f"backend 'keras' with {CONFIG_KEY}={wanted} {framework_missing(wanted)}")
    if not any(is_installed(name) for name in EXTRAS):
        raise BackendUnavailable(f"Keras needs TensorFlow, JAX or PyTorch to run on: {INSTALL_HINT}")


def framework_missing(name: str) -> str:
    return f"needs {name}: pip install 'fedplug-keras[{EXTRAS[name]}]'"


def check_choice(config: Config) -> str:
    """The run config's ``keras.backend``, or ``ConfigError`` if Keras has no such backend."""
    wanted = str(config.get(CONFIG_KEY, DEFAULT_BACKEND))
    if wanted not in EXTRAS:
        raise ConfigError(f"run-config '{CONFIG_KEY}' must be one of {', '.join(EXTRAS)}, got '{wanted}'")
    return wanted


def import_keras(config: Config) -> ModuleType:
    """Keras running on the run config's ``keras.backend``, imported on first use."""
    wanted = check_choice(config)
    keras = sys.modules.get("keras") or _first_import(wanted)
    active = keras.backend.backend()
    if active != wanted:
        raise BackendUnavailable(
            f"Keras is already imported in this process with the '{active}' backend (TensorFlow imports "
            f"Keras, and Flower's simulation imports TensorFlow) and picks its backend once per process: "
            f"also set KERAS_BACKEND={wanted} in the environment, or use {CONFIG_KEY}={active}"
        )
    _size_thread_pools(active)
    return keras


def set_seed(keras: ModuleType, seed: int) -> None:
    """``keras.utils.set_random_seed``, which also imports TensorFlow (for tf.data) when installed."""
    with held_back_stderr(unless_imported="tensorflow"):
        keras.utils.set_random_seed(seed)


def _first_import(name: str) -> ModuleType:
    if not is_installed(name):
        raise BackendUnavailable(f"{CONFIG_KEY} '{name}' {framework_missing(name)}")
    os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ INFO/WARNING/ERROR: CUDA probes
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with held_back_stderr():
        import keras
    module: ModuleType = keras
    return module


@functools.cache
def _size_thread_pools(name: str) -> None:
    """Give the framework this process's share of cores, once; let TensorFlow share GPUs.

    TensorFlow also runs its ops deterministically: with several threads, some of its CPU kernels
    (reductions in gradients) sum in an order that varies from run to run, and a resumed run
    would then not end bit-identical to an uninterrupted one.
    """
    threads = cpu_share()
    if name == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        try:
            for gpu in tf.config.list_physical_devices("GPU"):
                tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # the TensorFlow runtime was started by someone else already
            pass
    elif name == "torch":
        import torch

        torch.set_num_threads(threads)
