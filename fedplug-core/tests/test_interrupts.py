"""Whatever ends the `fedplug` command ends every process it started; runs started together never collide."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedplug.testing.runs import processes_of, read_rounds

FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
QUIET = {**os.environ, "FEDPLUG_PLUGINS": ""}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_stops_the_run_and_keeps_finished_rounds(sig: signal.Signals, tmp_path: Path) -> None:
    out = tmp_path / "signalled"
    command = [FEDPLUG, "run", "numpy", "--rounds", "1000", "--nodes", "2", "--out", str(out)]  # cannot finish first
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=QUIET)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(r["round"] >= 1 for r in read_rounds(out)):
        time.sleep(0.3)
    assert read_rounds(out), "no round finished within 5 minutes"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    assert f"got {sig.name}" in stdout and "Traceback" not in stderr
    time.sleep(10)  # "within a few seconds"
    assert processes_of(out) == [], f"processes of the run outlived {sig.name}"
    rounds = read_rounds(out)
    assert 1 <= len(rounds) < 1001 and (out / "metrics.png").is_file()
    json.loads((out / "config.json").read_text())


def test_two_runs_started_together_get_their_own_folders(tmp_path: Path) -> None:
    command = [FEDPLUG, "run", "numpy", "--rounds", "1", "--nodes", "2", "--run-config", "hidden-dims='16'"]
    procs = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=QUIET)
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=900) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, f"{stdout}\n{stderr}"
    folders = sorted((tmp_path / "fedplug-runs").iterdir())
    assert len(folders) == 2, folders
    for folder in folders:
        assert [r["round"] for r in read_rounds(folder)] == [0, 1]
