"""End-to-end test helpers: run the real ``fedplug`` command and check its results folder.

fedplug's own tests use them in every distribution, and a backend's tests may too::

    # conftest.py at the root of your tests
    pytest_plugins = ["fedplug.testing.runs"]

    def test_my_backend_learns(run_fedplug):
        _, out = run_fedplug("mything", "--rounds", "2", "--nodes", "2")
        rounds = check_results(out, ".mything")

The plugin gives the ``run_fedplug`` fixture; the functions are imported from this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import psutil
import pytest

from fedplug.rounds import TIMING_KEYS

__all__ = [
    "RESULT_FILES",
    "RunFedplug",
    "assert_killed_run_resumes_bit_identical",
    "assert_same_run",
    "check_results",
    "cli",
    "fedplug",
    "kill_after_round",
    "processes_of",
    "read_rounds",
    "run_fedplug",
    "wait_for",
]

Record = dict[str, Any]
"""One round's record in ``metrics.json``."""

RESULT_FILES = ("config.json", "metrics.json", "metrics.csv", "metrics.png", "weights.npz")


def fedplug(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the installed `fedplug` command of this environment."""
    command = [str(Path(sys.executable).with_name("fedplug")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``fedplug ARGS`` in this process, as ``fedplug()`` does in a new one: for commands that start nothing.

    A new process costs a second of imports; the fast tests of the CLI's checks and errors run here.
    ``env`` is set for the call, and plugins are discovered again for it.
    """
    from typer.testing import CliRunner

    from fedplug.cli import app
    from fedplug.plugins import get_registry

    get_registry.cache_clear()
    try:
        result = CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    finally:
        get_registry.cache_clear()
    return subprocess.CompletedProcess(["fedplug", *args], result.exit_code, result.stdout, result.stderr)


def check_results(out: Path, suffix: str) -> list[Record]:
    """Assert that ``out`` holds every promised file; return the per-round metrics."""
    for name in (*RESULT_FILES, f"model{suffix}"):
        assert (out / name).is_file(), f"results folder lacks {name}: {sorted(p.name for p in out.iterdir())}"
    rounds: list[Record] = json.loads((out / "metrics.json").read_text())["rounds"]
    return rounds


def processes_of(out: Path) -> list[str]:
    """Command lines of live processes started for the run writing ``out`` (marked by FEDPLUG_RUN_DIR)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.environ().get("FEDPLUG_RUN_DIR") == str(out.resolve()):
                found.append(" ".join(proc.info["cmdline"] or [])[:120])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def end_processes_of(out: Path, *started: subprocess.Popen[Any]) -> None:
    """SIGKILL ``started`` and every live process of the run writing ``out``: a failed test leaves none behind."""
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FEDPLUG_RUN_DIR") == str(out.resolve()):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def read_rounds(out: Path) -> list[Record]:
    """The rounds in ``out/metrics.json``, or [] while there are none (the file is written atomically)."""
    try:
        rounds: list[Record] = json.loads((out / "metrics.json").read_text())["rounds"]
    except (OSError, ValueError):
        return []
    return rounds


def assert_same_run(a: Path, b: Path, native: str | None = None) -> None:
    """Two runs of one config and seed: the same canonical weights and metrics (timings aside), bit for bit.

    ``native`` names the native model file to compare byte for byte too, where the framework's format
    is deterministic (Keras writes the save date into ``.keras``: it is compared through weights.npz).
    """
    for name in ("weights.npz", *([native] if native else [])):
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between two runs of one seed"

    def without_timings(out: Path) -> list[Record]:
        return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in read_rounds(out)]

    assert without_timings(a) == without_timings(b), "metrics differ between two runs of one seed"


class RunFedplug(Protocol):
    """The ``run_fedplug`` fixture: ``fedplug run BACKEND ARGS`` into a fresh folder, asserting it succeeds."""

    def __call__(
        self, backend: str, *args: str, env: dict[str, str] | None = None, name: str = ""
    ) -> tuple[subprocess.CompletedProcess[str], Path]: ...


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def kill_after_round(
    backend: str, out: Path, args: Sequence[str], after: int, env: dict[str, str] | None = None
) -> int:
    """Start ``fedplug run BACKEND --out OUT ARGS``, SIGKILL it once round ``after`` is finished; return the
    last finished round. Every process of the run must be gone soon after (they die with their parent)."""
    command = [str(Path(sys.executable).with_name("fedplug")), "run", backend, "--out", str(out), *args]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or any(r["round"] >= after for r in read_rounds(out)),
            900,
            f"round {after} of the run in {out}",
            every=0.02,  # a round's record is written once its evaluation is back, often with the next round's
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_for(lambda: processes_of(out) == [], 60, "the processes of the killed run to end")
    return max(int(r["round"]) for r in read_rounds(out))


def assert_killed_run_resumes_bit_identical(
    backend: str,
    reference: Path,
    args: Sequence[str],
    native: str | None,
    env: dict[str, str] | None = None,
    after: int = 1,
) -> subprocess.CompletedProcess[str]:
    """Resumable, bit for bit: ``args`` run again, killed with SIGKILL after round ``after``, then resumed
    with ``fedplug run --resume``, ends identical to ``reference``, a finished run of ``args`` (same seed).

    Compared: weights, metrics (timings aside), and the native model file ``native`` where the framework
    writes it deterministically. The killed run's folder is ``reference``'s name + ``-killed``; returns the
    resuming command's result.
    """
    total = int(args[list(args).index("--rounds") + 1])
    out = reference.with_name(f"{reference.name}-killed")
    finished = kill_after_round(backend, out, args, after, env)
    assert after <= finished < total, f"the run was not killed mid-way: {finished} of {total} rounds finished"
    resumed = fedplug("run", "--resume", str(out), env=env)
    assert resumed.returncode == 0, f"resume failed:\n{resumed.stdout}\n{resumed.stderr}"
    assert f"resuming {backend}" in resumed.stdout, resumed.stdout
    assert [r["round"] for r in read_rounds(out)] == list(range(total + 1))
    assert_same_run(reference, out, native)
    return resumed


@pytest.fixture
def run_fedplug(tmp_path: Path) -> RunFedplug:
    """Run ``fedplug run BACKEND ARGS`` into a fresh folder; return (process, folder)."""

    def run(
        backend: str, *args: str, env: dict[str, str] | None = None, name: str = ""
    ) -> tuple[subprocess.CompletedProcess[str], Path]:
        out = tmp_path / f"run-{backend}{name}"
        proc = fedplug("run", backend, "--out", str(out), *args, env=env)
        assert proc.returncode == 0, f"fedplug run {backend} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc, out

    return run
