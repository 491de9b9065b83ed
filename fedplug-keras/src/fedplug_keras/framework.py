"""Choose the framework Keras runs on, then import Keras quietly, once per process.

Keras reads ``KERAS_BACKEND`` when it is first imported and never again, so the
run-config key ``keras.backend`` (not the environment) decides it here, before
that first import. Keras is first imported here and nowhere else, unless something
imported it earlier: TensorFlow imports Keras, and Flower's simulation imports
TensorFlow when it is installed. That case is detected and explained.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

from fedplug.backend import BackendUnavailable, Config
from fedplug.config import ConfigError
from fedplug.runtime import cpu_share

CONFIG_KEY = "keras.backend"
DEFAULT_BACKEND = "tensorflow"
EXTRAS = {"tensorflow": "tensorflow-cpu", "jax": "jax", "torch": "torch"}
"""Keras backend (also the import name of its framework) -> the fedplug-keras extra installing it."""
INSTALL_HINT = (
    "pip install 'fedplug-keras[tensorflow]' (GPU) or 'fedplug-keras[tensorflow-cpu]' (or the extras [jax], [torch])"
)


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed() -> None:
    """Raise ``BackendUnavailable`` unless Keras and at least one framework for it are installed."""
    if not is_installed("keras"):
        raise BackendUnavailable(f"backend 'keras' needs Keras 3: {INSTALL_HINT}")
    if not any(is_installed(name) for name in EXTRAS):
        raise BackendUnavailable(f"Keras needs TensorFlow, JAX or PyTorch to run on: {INSTALL_HINT}")


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
        raise BackendUnavailable(f"{CONFIG_KEY} '{name}' needs {name}: pip install 'fedplug-keras[{EXTRAS[name]}]'")
    os.environ["KERAS_BACKEND"] = name
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++ INFO/WARNING/ERROR: CUDA probes
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    with held_back_stderr():
        import keras
    return keras


@contextlib.contextmanager
def held_back_stderr(unless_imported: str = "") -> Iterator[None]:
    """Hold back what native code writes to stderr (fd 2) in the block; show it if the block fails.

    TensorFlow logs its oneDNN notice before its log level is read, so
    ``TF_CPP_MIN_LOG_LEVEL`` cannot hide it; the import itself is held back instead.
    Nothing is held back if module ``unless_imported`` is already imported.
    """
    if unless_imported in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


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
