"""How JAX starts in a fedplug process: quiet, with sane threads, compiling each program once.

A value the user has set already always wins.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path

from fedplug.runtime import cpu_share

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
