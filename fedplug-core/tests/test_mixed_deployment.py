"""The mission in one test: one federation, machines with different frameworks, each installing only
what it can run.

On loopback: a SuperLink and the ServerApp in this test environment; a PyTorch SuperNode and a JAX
SuperNode from this environment; an MXNet SuperNode from the MXNet environment (numpy<2, only
fedplug-core and fedplug-mxnet installed); and a fourth SuperNode, also in the MXNet environment,
that names a backend its environment lacks (``mlx``). Each SuperNode names its backend in its node
config: three through ``fedplug supernode BACKEND``, the JAX one with plain Flower
(``flower-supernode --node-config "partition-id=1 num-partitions=4 backend='jax'"``).

The MXNet environment is ``FEDPLUG_MXNET_VENV`` (tests/run-all.sh builds it first and sets it), else
``.venv-mxnet`` at the repository's root. Without it the test fails, saying how to make it: it never
skips. Every wait is on a condition; every process is gone at the end (checked).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import suppress
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARK = "FEDPLUG_TEST_PROCESS"
MXNET_VENV_ENV = "FEDPLUG_MXNET_VENV"


def mxnet_venv() -> Path:
    """The MXNet test environment; an assertion error (never a skip) when it is missing."""
    given = os.environ.get(MXNET_VENV_ENV)
    venv = Path(given) if given else ROOT / ".venv-mxnet"
    fedplug = venv / "bin" / "fedplug"
    assert fedplug.is_file(), (
        f"the MXNet test environment is missing ({fedplug} not found): run tests/run-all.sh, or build it with "
        f"`python3.11 -m venv .venv-mxnet && .venv-mxnet/bin/pip install ./fedplug-core ./fedplug-mxnet` "
        f"and/or set {MXNET_VENV_ENV}=/path/to/.venv-mxnet"
    )
    return venv


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def marked(value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.environ().get(MARK) == value:
                found.append(proc)
    return found


def test_one_federation_of_torch_jax_and_mxnet_nodes_from_two_environments(tmp_path: Path) -> None:
    mxnet = mxnet_venv()
    port, mark = free_port(), uuid.uuid4().hex
    address = f"127.0.0.1:{port}"
    base_env = {k: v for k, v in os.environ.items() if k != "FEDPLUG_PLUGINS"}
    # plain Flower commands keep their apps under FLWR_HOME (default ~/.flwr): this test's own, never the user's
    env = {**base_env, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0", MARK: mark,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    # the MXNet environment's own commands first on its PATH: its SuperNode starts its own SuperExec
    mx_env = {**env, "PATH": f"{mxnet / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str, command: list[str], environment: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        output = tmp_path / f"{name}.out"
        with open(output, "wb") as file:
            process = subprocess.Popen(
                command, stdout=file, stderr=subprocess.STDOUT, env=environment, cwd=tmp_path, start_new_session=True
            )
        started.append((process, output))
        return process, output

    def wait_for(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while text not in path.read_text(errors="replace"):
            assert process.poll() is None, f"{process.args} ended:\n{path.read_text(errors='replace')}"
            assert time.monotonic() < deadline, f"no '{text}' in {path.name} after {timeout} s:\n{path.read_text()}"
            time.sleep(0.2)

    def fedplug_node(python_bin: Path, backend: str, partition: int, environment: dict[str, str]) -> None:
        node, out = start(
            f"node-{backend}",
            [str(python_bin / "fedplug"), "supernode", backend, "--superlink", address, "--insecure",
             "--data", "embedded", "--partition-id", str(partition), "--num-partitions", "4",
             "--log", f"node-{backend}.log"],
            environment,
        )  # fmt: skip
        wait_for(out, "connected to", node)

    def flower_node(python_bin: Path, node_config: str, environment: dict[str, str], name: str) -> None:
        node, out = start(
            name,
            [str(python_bin / "flower-supernode"), "--insecure", "--superlink", address,
             "--port", str(free_port()), "--node-config", node_config],
            environment,
        )  # fmt: skip
        wait_for(out, "SuperNode ID:", node)

    try:
        link, link_out = start(
            "superlink",
            [str(BIN / "fedplug"), "superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)],
            env,
        )
        wait_for(link_out, "SuperLink ready", link)
        fedplug_node(BIN, "torch", 0, env)
        flower_node(BIN, "partition-id=1 num-partitions=4 backend='jax'", env, "node-jax")
        fedplug_node(mxnet / "bin", "mxnet", 2, mx_env)
        # a node whose operator named a backend that its environment does not have
        flower_node(mxnet / "bin", "partition-id=3 num-partitions=4 backend='mlx'", mx_env, "node-no-mlx")
        out = tmp_path / "results"
        # the ServerApp's backend is torch; plain SGD everywhere (lr 0.1, no momentum, batch 32)
        done = subprocess.run(
            [str(BIN / "fedplug"), "run", "torch", "--superlink", address, "--insecure", "--model", "mlp",
             "--rounds", "3", "--dataset", "embedded", "--fraction-train", "1", "--fraction-evaluate", "0",
             "--run-config", "hidden-dims='64' lr=0.1 momentum=0.0 batch-size=32", "--out", str(out)],
            capture_output=True, text=True, timeout=900, env={**env, "FEDPLUG_PLUGINS": "torch"}, cwd=tmp_path,
        )  # fmt: skip
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in tmp_path.glob("*.out"))
        assert done.returncode == 0, done.stdout + done.stderr + logs
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2, 3]
        for record in rounds[1:]:
            assert record["partition-backends"] == {"0": "torch", "1": "jax", "2": "mxnet"}, record
            assert record["train-backends"] == {"torch": 1, "jax": 1, "mxnet": 1}, record
            assert record["train-nodes"] == 3 and not record["train-failures"], record
        assert rounds[-1]["centralized-accuracy"] >= 0.85, [r.get("centralized-accuracy") for r in rounds]
        # the node without fedplug-mlx: one clear reason in the run's failures, not a hang
        unusable = [failure for record in rounds for failure in record.get("unusable-nodes", [])]
        assert len(unusable) == 1 and "unknown backend 'mlx'" in unusable[0]["reason"], unusable
        assert "pip install fedplug-mlx" in unusable[0]["reason"]
        shown = " ".join(done.stdout.split())
        assert "failed: 1 node: query raised UnknownBackend: unknown backend 'mlx'" in shown, done.stdout
        assert "(torch 1, jax 1, mxnet 1)" in shown and "backends: torch 0 · jax 1 · mxnet 2" in shown, done.stdout
        # the MXNet node ran in the other environment: numpy<2 there, numpy>=2 here
        ran = subprocess.run(
            [str(mxnet / "bin" / "python"), "-c", "import numpy; print(numpy.__version__)"],
            capture_output=True, text=True, timeout=120, env=mx_env,
        )  # fmt: skip
        assert ran.returncode == 0 and ran.stdout.startswith("1."), ran.stdout + ran.stderr
        assert not np.__version__.startswith("1.")
        assert (out / "model.pt").is_file()
        # the plain Flower nodes installed the run's app in this test's FLWR_HOME (not in the user's ~/.flwr)
        assert list((tmp_path / "flwr-home" / "apps").iterdir()), "the Flower nodes did not use the test's FLWR_HOME"
    finally:
        for process, _ in started:  # Ctrl-C, as a person would
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
        for process, _ in started:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        left = marked(mark)
        for proc in left:
            with suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
    assert not left, f"processes outlived the federation: {[p.pid for p in left]}"
