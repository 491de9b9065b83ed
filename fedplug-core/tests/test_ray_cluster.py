"""A warm engine: `fedplug run --ray-address HOST:PORT` simulates on a Ray cluster that is already running,
and leaves it running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import psutil
import pytest

from fedplug.deployment.network import port_open
from fedplug.testing.runs import check_results, processes_of, wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """(address, temporary folder) of a Ray head on loopback (``ray start --head --block``), in a process
    group of its own that the fixture ends; its own folder, so it shares nothing with other tests' Ray."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="fp-ray-")  # short: Ray's socket paths have a length limit
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
        "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]  # fmt: skip
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: port_open("127.0.0.1", port) or head.poll() is not None, 120, "the Ray head")
        assert head.poll() is None, "ray start --head failed"
        yield f"127.0.0.1:{port}", Path(temp)
        assert head.poll() is None, "the run stopped a Ray cluster it did not start"
    finally:
        end_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def end_group(leader: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of ``leader``, SIGKILL what is left of it 10 s later."""
    members = []
    for process in psutil.process_iter():
        with suppress(ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            if os.getpgid(process.pid) == leader.pid:
                members.append(process)
    with suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=10)
    if alive:
        with suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=10)
    leader.wait()


def test_a_run_on_a_running_ray_cluster_leaves_the_cluster_running(ray_head: tuple[str, Path], run_fedplug) -> None:
    address, folder = ray_head
    _, out = run_fedplug(
        "numpy", "--rounds", "2", "--nodes", "3", "--run-config", "hidden-dims='16'", "--ray-address", address,
        env={"FEDPLUG_PLUGINS": ""},
    )  # fmt: skip
    rounds = check_results(out, ".npz")
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["train-nodes"] == 3
    assert rounds[2]["centralized-accuracy"] > rounds[0]["centralized-accuracy"]
    assert processes_of(out) == [], "processes of the run outlived it"
    # the run's driver (its simulation process) connected to this cluster, which logged it and still answers
    assert len(list(folder.glob("session_latest/logs/python-core-driver-*.log"))) == 1
    host, port = address.split(":")
    assert port_open(host, int(port)), "the cluster stopped answering"
