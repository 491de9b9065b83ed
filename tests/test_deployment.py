"""The same apps on Flower's Deployment Engine: a SuperLink and two SuperNodes on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.simulation import write_flower_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_processes_of(home: Path) -> None:
    """Kill every process started with FLWR_HOME=home (SuperLink, SuperExec, SuperNodes, app processes)."""
    killed = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == str(home):
                proc.kill()
                killed.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    psutil.wait_procs(killed, timeout=15)


def test_results_flower_app_runs_on_the_deployment_engine(tmp_path: Path) -> None:
    out, home = tmp_path / "results", tmp_path / "flwr-home"
    home.mkdir()
    config = resolve(NumpyBackend(), {"num-supernodes": 2, "num-server-rounds": 2, "out": str(out)})
    app = write_flower_app(tmp_path, config)
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FEDPLUG_PLUGINS": "",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            subprocess.Popen(
                [str(bin_dir / name.split("-node")[0]), *args], stdout=log, stderr=log, env=env, start_new_session=True
            )

    try:
        start("flower-superlink", "--insecure", "--port", str(link), "--disable-runtime-dependency-installation")
        time.sleep(5)
        for i in range(2):
            start(
                f"flower-supernode-node{i}",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={i} num-partitions=2",
            )
        done = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "local", "--stream"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        details = done.stdout[-2000:] + "".join(p.read_text()[-1000:] for p in logs.iterdir())
        assert done.returncode == 0, details
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2], details
        assert rounds[2]["centralized-accuracy"] > rounds[0]["centralized-accuracy"] + 0.5
        assert rounds[1]["train-nodes"] == 2
        assert (out / "model.npz").is_file() and (out / "metrics.png").is_file()
    finally:
        stop_processes_of(home)
