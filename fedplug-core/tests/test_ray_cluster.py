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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
    """(address, temporary folder) of a Ray head on loopback with 2 CPUs."""
    with running_head("--num-cpus=2") as head:
        yield head


@contextmanager
def running_head(*resources: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """(address, temporary folder) of a Ray head on loopback (``ray start --head --block``) with ``resources``, in a
    process group of its own that ends with the block; its own folder, so it shares nothing with other tests' Ray."""
    port, temp = free_port(), tempfile.mkdtemp(prefix="fp-ray-")  # short: Ray's socket paths have a length limit
    command = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
        "--node-ip-address=127.0.0.1", *resources, "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]  # fmt: skip
    head = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
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
    # two drivers connected to this cluster, which logged them and still answers: the plan's check of the client
    # resources against the cluster's (connect, read, disconnect) and the run's simulation process
    assert len(list(folder.glob("session_latest/logs/python-core-driver-*.log"))) == 2
    host, port = address.split(":")
    assert port_open(host, int(port)), "the cluster stopped answering"


def test_client_resources_are_checked_against_the_cluster_and_client_gpus_0_hides_the_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cluster of 1 CPU and 1 GPU (declared: this machine has none) whose workers would see GPU 0: Ray 2.55 empties
    CUDA_VISIBLE_DEVICES for a task without GPUs only by a default it has announced it will drop (its FutureWarning);
    the cluster here runs with that default dropped already."""
    import ray

    from fedplug import machine
    from fedplug.errors import ConfigError
    from fedplug.plan import plan_run
    from fedplug.simulation import start_ray

    assert machine.cores() >= 2 and machine.gpus() == 0, "this test needs a machine of 2 cores or more and no GPU"
    gpu_0 = {"CUDA_VISIBLE_DEVICES": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    with running_head("--num-cpus=1", "--num-gpus=1", env=gpu_0) as (address, _):
        # --client-cpus: this machine has the cores, the cluster does not
        refused = pytest.raises(ConfigError, match="more than the 1 CPUs of the Ray cluster at")
        with warnings.catch_warnings(record=True) as warned, refused:  # the error is the one line on stderr
            warnings.simplefilter("always")
            plan_run("numpy", {}, client_cpus=machine.cores(), ray_address=address, create=False)
        assert not [str(w.message) for w in warned if "ray" in w.filename], "Ray warned on stderr"
        # --client-gpus: the cluster has the GPU, this machine does not; by default the clients share it
        assert plan_run("numpy", {}, client_gpus=1.0, ray_address=address, create=False).engine.client_gpus == 1.0
        assert plan_run("numpy", {}, ray_address=address, create=False).engine.client_gpus == 1.0
        with pytest.raises(ConfigError, match=r"the Ray cluster at .* has only 1 GPUs"):
            plan_run("numpy", {}, client_gpus=2.0, ray_address=address, create=False)

        @ray.remote(num_cpus=1, num_gpus=0)
        def visible() -> str | None:
            return os.environ.get("CUDA_VISIBLE_DEVICES")

        monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # start_ray sets it: restored after
        start_ray(1.0, 0.0, address=address, log_to_driver=False)  # as the simulation starts it for --client-gpus 0
        try:
            assert ray.get(visible.remote(), timeout=120) == ""  # before the fix (measured): "0"
        finally:
            ray.shutdown()
