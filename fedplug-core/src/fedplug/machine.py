"""What this machine offers a run: CPU cores and NVIDIA GPUs, counted one way everywhere."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

from fedplug.errors import ConfigError


def cores() -> float:
    """CPU cores this process may use: its affinity, capped by a cgroup (v2) CPU quota."""
    count: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return count


@cache
def gpus() -> int:
    """The machine's NVIDIA GPUs, as ``nvidia-smi -L`` lists them (0 without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in done.stdout.splitlines())


def gpu_share(client_cpus: float) -> float:
    """GPUs per client so that the clients running in parallel share the machine's NVIDIA GPUs."""
    count = gpus()
    parallel = max(1, int(cores() // client_cpus))
    return round(count / parallel, 4) if count else 0.0


def check_resources(client_cpus: float, client_gpus: float | None) -> None:
    """Refuse client resources Ray could never grant on this machine: the simulation would wait forever."""
    have = cores()
    if not math.isfinite(client_cpus) or client_cpus <= 0:
        raise ConfigError(f"--client-cpus must be a positive number of cores, e.g. 1 or 0.5; got {client_cpus}")
    if client_cpus > have:
        raise ConfigError(
            f"--client-cpus {client_cpus:g} is more than this machine's {have:g} cores; use at most {have:g}"
        )
    if client_gpus is None:
        return
    if not math.isfinite(client_gpus) or client_gpus < 0:
        raise ConfigError(f"--client-gpus must be 0 or a positive number of GPUs, e.g. 0.5; got {client_gpus}")
    if client_gpus > 0:
        count = gpus()
        if not count:
            raise ConfigError("--client-gpus: this machine has no NVIDIA GPU (no nvidia-smi); leave it out or use 0")
        if client_gpus > count:
            raise ConfigError(
                f"--client-gpus {client_gpus:g} is more than the {count} GPUs of this machine; use at most {count}"
            )
