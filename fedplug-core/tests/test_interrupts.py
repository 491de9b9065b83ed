"""Whatever ends the `fedplug` command ends every process it started; runs started together never collide."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedplug.testing.runs import end_processes_of, processes_of, read_rounds, wait_for

FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
QUIET = {**os.environ, "FEDPLUG_PLUGINS": ""}


def ignore_sigint() -> None:
    """What a shell does to a command it starts in the background (``fedplug run ... &``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda sig: sig.name)
def test_signal_stops_the_run_and_keeps_finished_rounds(sig: signal.Signals, tmp_path: Path) -> None:
    """Ctrl-C (even for a run a shell started in the background), `kill`, a closed terminal: the command
    stops within seconds with 128 + the signal, keeps every finished round and leaves no process behind."""
    out = tmp_path / "signalled"
    command = [FEDPLUG, "run", "numpy", "--rounds", "1000", "--nodes", "2", "--out", str(out)]  # cannot finish first
    # output to files, not pipes: reading a pipe to its end would also wait for any grandchild holding it
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout_path, "w") as stdout_file, open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen(
            command,
            stdout=stdout_file,
            stderr=stderr_file,
            env=QUIET,
            preexec_fn=ignore_sigint if sig == signal.SIGINT else None,
        )
    try:
        wait_for(lambda: any(r["round"] >= 1 for r in read_rounds(out)), 300, "round 1")
        assert any("raylet" in line for line in processes_of(out)), "the marker does not reach Ray's processes"
        proc.send_signal(sig)
        proc.wait(timeout=90)
    finally:
        end_processes_of(out, proc)
    stdout, stderr = stdout_path.read_text(), stderr_path.read_text()
    assert proc.returncode == 128 + sig, (proc.returncode, stderr)
    said = "interrupted" if sig == signal.SIGINT else f"got {sig.name}"
    assert said in stdout and "Traceback" not in stderr, (stdout, stderr)
    wait_for(lambda: processes_of(out) == [], 10, f"the processes of the run to end after {sig.name}")
    assert 1 <= len(read_rounds(out)) < 1001
    assert (out / "metrics.png").is_file() and (out / "metrics.csv").is_file()
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


ORPHAN = r"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                         env={**os.environ, "FEDPLUG_PARENT_PID": str(os.getpid())})
print(child.pid, flush=True)
time.sleep(120)
"""
WITHOUT_PDEATHSIG = r"""
import sys, time
sys.platform = "darwin"  # as on macOS: no parent-death signal, only the watchdog
from fedplug import simulation
simulation.die_with_parent()
open(sys.argv[1], "w").close()  # ready
time.sleep(120)
"""


def test_the_simulation_process_ends_itself_when_the_command_dies_without_a_parent_death_signal(
    tmp_path: Path,
) -> None:
    """macOS has no parent-death signal: the simulation's watchdog notices the command is gone (SIGKILL)."""
    ready = tmp_path / "ready"
    parent = subprocess.Popen(
        [sys.executable, "-c", ORPHAN, WITHOUT_PDEATHSIG, str(ready)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        wait_for(ready.exists, timeout=60, what="the simulation process to set up its watch")
        os.kill(child, 0)  # running
        parent.kill()
        parent.wait(timeout=10)

        def gone() -> bool:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{child}/stat") as stat:  # a zombie waiting for init counts as gone
                return stat.read().split()[2] == "Z"

        wait_for(gone, timeout=15, what="the orphaned simulation process to end itself")
    finally:
        parent.kill()
