"""The demo federation of the README on a trusted network: ``fedplug superlink --insecure`` and two
``fedplug supernode --data embedded --partition-id I`` nodes, a run submitted with ``--insecure``.

Every wait is on a condition; every process is gone at the end (checked).
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

import psutil

FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
MARK = "FEDPLUG_TEST_PROCESS"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    wanted = "".join(text.split())  # the terminal wraps long lines anywhere
    while wanted not in "".join(path.read_text(errors="replace").split()):
        assert process.poll() is None, f"{process.args} ended:\n{path.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"no '{text}' in {path.name} after {timeout} s:\n{path.read_text()}"
        time.sleep(0.2)


def marked(value: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with suppress(psutil.Error):
            if proc.environ().get(MARK) == value:
                found.append(proc)
    return found


def test_insecure_demo_federation_with_embedded_partitions(tmp_path: Path) -> None:
    port, mark = free_port(), uuid.uuid4().hex
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "FEDPLUG_PLUGINS": "", "FLWR_TELEMETRY_ENABLED": "0", MARK: mark}
    started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        output = tmp_path / f"{name}.out"
        with open(output, "wb") as file:
            process = subprocess.Popen([FEDPLUG, *args], stdout=file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        started.append((process, output))
        return process, output

    try:
        link, link_out = start("superlink", "superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port))
        wait_for_line(link_out, "SuperLink ready", link)
        assert "--insecure: no TLS and no SuperNode authentication" in link_out.read_text()
        for index in range(2):
            node, node_out = start(
                f"node{index}", "supernode", "numpy", "--superlink", address, "--insecure", "--data", "embedded",
                "--partition-id", str(index), "--num-partitions", "2", "--log", f"node{index}.log",
            )  # fmt: skip
            wait_for_line(node_out, "connected to", node)
        out = tmp_path / "results"
        done = subprocess.run(
            [FEDPLUG, "run", "numpy", "--superlink", address, "--insecure", "--rounds", "1", "--dataset", "embedded",
             "--fraction-evaluate", "0", "--run-config", "hidden-dims='32'", "--out", str(out)],
            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1]
        assert rounds[1]["train-nodes"] == 2 and rounds[1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"]
        assert sorted(rounds[1]["train-partitions"]) == [0, 1]
        # Ctrl-C on the SuperLink while a run streams its log to `fedplug run`: Flower's SuperLink (uvicorn) waits
        # for that stream to close unless told twice; fedplug superlink still ends within seconds, as on SIGTERM
        streaming = tmp_path / "streaming.out"
        with open(streaming, "wb") as file:
            submitted = subprocess.Popen(
                [FEDPLUG, "run", "numpy", "--superlink", address, "--insecure", "--rounds", "100",
                 "--fraction-evaluate", "0", "--run-config", "hidden-dims='32'", "--out", str(tmp_path / "stopped")],
                stdout=file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            )  # fmt: skip
        started.append((submitted, streaming))
        wait_for_line(streaming, "(written by the ServerApp)", submitted, timeout=300)  # the run streams its log
        link.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        link.wait(timeout=60)
        stopped = time.monotonic() - interrupted
        assert link.returncode == 130 and "stopping the SuperLink" in link_out.read_text()
        # it took 26.6 s, and at least 20 s: SIGINT, 15 s, SIGTERM (which uvicorn ignores when stopping), 5 s, SIGKILL;
        # now 10 s at a load of 14 on 2 cores
        assert stopped < 15, f"fedplug superlink took {stopped:.1f} s to end after Ctrl-C during a run"
        assert submitted.wait(timeout=60) != 0, "the run went on without its SuperLink"
    finally:
        for process, _ in started:  # Ctrl-C
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
        for process, _ in started:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
        left = marked(mark)
        for proc in left:
            with suppress(psutil.Error):
                proc.kill()
    assert not left, f"processes outlived their fedplug command: {left}"
    assert all(process.returncode == 130 for process, _ in started[:3]), [p.returncode for p, _ in started]
