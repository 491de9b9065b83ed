"""JAX, Flax and Optax, imported only after ``prepare_process`` set their environment.

How JAX starts in a fedplug process: quiet, with sane threads, compiling each program
once; a value the user has set already always wins. The backend's JAX modules import
the frameworks from here, so no import order can start JAX before its thread pool,
logging and compilation cache are configured.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

from fedplug.toolkit import cpu_share

MIN_CACHED_COMPILE_SECONDS = 0.1
"""Compiles slower than this go to the persistent cache (JAX's default is 1 s)."""


@cache
def prepare_process() -> None:
    """Set what JAX reads when it creates its first device client; call before using JAX.

    JAX reads these when first needed, not at import, so they also take effect when
    another library imported JAX first (Flower's simulation imports TensorFlow, which
    imports JAX).

    - ``PJRT_NPROC`` sizes XLA's CPU thread pool to the cores this Flower worker may use.
    - ``XLA_PYTHON_CLIENT_PREALLOCATE=false``: several simulated nodes may share one GPU,
      so no process grabs 75% of its memory up front (JAX's default).
    - ``TF_CPP_MIN_LOG_LEVEL=2`` keeps XLA's C++ info and warning lines off the terminal.
    - The ``jax._src.xla_bridge`` logger reports platform probes ("An NVIDIA GPU may be
      present...", TPU probes, experimental plugins) as warnings: only errors pass.
      JAX still picks a GPU whenever a working CUDA or ROCm plugin is installed.
    """
    os.environ.setdefault("PJRT_NPROC", str(cpu_share()))
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def compilation_cache_dir() -> Path:
    """Where JAX's persistent compilation cache keeps compiled programs.

    Every simulated worker process (and every run) compiles the same programs; with the
    cache all but the first load them from disk instead of compiling again.
    """
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedplug" / "jax"


prepare_process()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx, serialization  # noqa: E402

# jax.config's options are untyped attributes set by name
if jax.config.jax_compilation_cache_dir is None:  # type: ignore[attr-defined]  # the user set none
    jax.config.update("jax_compilation_cache_dir", str(compilation_cache_dir()))  # type: ignore[no-untyped-call]
    jax.config.update(  # type: ignore[no-untyped-call]
        "jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS
    )

__all__ = ["jax", "jnp", "nnx", "optax", "serialization"]
