"""Whether MLX can run on this machine, decided without importing it where possible.

MLX runs on Apple silicon Macs (Metal, wheel ``mlx`` + ``mlx-metal``) and on Linux
(CPU through ``mlx[cpu]``, NVIDIA GPUs through ``mlx[cuda12]``/``mlx[cuda13]``). The
``mlx`` wheel alone holds only the Python bindings; the compute library ``libmlx``
comes from one of those companion distributions.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from pathlib import Path


def install_hint(system: str) -> str:
    """The pip command that installs a working MLX on ``system``."""
    if system == "Darwin":
        return "pip install --force-reinstall mlx"
    return "pip install 'mlx[cpu]' (or 'mlx[cuda12]' for an NVIDIA GPU)"


def platform_problem(system: str, machine: str) -> str | None:
    """Why MLX has no build for this OS and CPU, or None."""
    if system == "Darwin" and machine != "arm64":
        return (
            f"MLX needs an Apple silicon Mac and a native arm64 Python, this Python is {machine} "
            "(Intel Mac or Rosetta); use another backend (fedplug list)"
        )
    if system not in ("Darwin", "Linux"):
        return (
            f"MLX runs on Apple silicon Macs and on Linux, not on {system or 'this system'}; "
            "use WSL 2 or another backend (fedplug list)"
        )
    return None


def has_native_library() -> bool:
    """Whether MLX's compute library is installed beside its bindings (or loads anyway)."""
    spec = importlib.util.find_spec("mlx")
    folders = (spec.submodule_search_locations or []) if spec else []
    if any(any((Path(folder) / "lib").glob("libmlx.*")) for folder in folders):
        return True
    try:  # other layouts, e.g. conda-forge's separate libmlx package
        importlib.import_module("mlx.core")
    except ImportError:
        return False
    return True


def problem() -> str | None:
    """One line saying why MLX cannot run here and what to install, or None."""
    system, machine = platform.system(), platform.machine().lower()
    if reason := platform_problem(system, machine):
        return reason
    if importlib.util.find_spec("mlx") is None:
        return f"MLX is not installed: {install_hint(system)}"
    if not has_native_library():
        return f"mlx is installed without its compute library (libmlx): {install_hint(system)}"
    return None
