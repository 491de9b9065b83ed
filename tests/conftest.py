"""Shared test helpers: run the real `fedplug` command and check its results folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RESULT_FILES = ("config.json", "metrics.json", "metrics.csv", "metrics.png", "weights.npz")


def fedplug(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the installed `fedplug` command of this environment."""
    command = [str(Path(sys.executable).with_name("fedplug")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def check_results(out: Path, suffix: str) -> list[dict]:
    """Assert that ``out`` holds every promised file; return the per-round metrics."""
    for name in (*RESULT_FILES, f"model{suffix}"):
        assert (out / name).is_file(), f"results folder lacks {name}: {sorted(p.name for p in out.iterdir())}"
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    return rounds


@pytest.fixture
def run_fedplug(tmp_path: Path):
    """Run ``fedplug run BACKEND ARGS`` into a fresh folder; return (process, folder)."""

    def run(backend: str, *args: str, env: dict[str, str] | None = None):
        out = tmp_path / f"run-{backend}"
        proc = fedplug("run", backend, "--out", str(out), *args, env=env)
        assert proc.returncode == 0, f"fedplug run {backend} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc, out

    return run
