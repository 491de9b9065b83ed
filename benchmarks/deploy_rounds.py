"""Per-round wall time of a real 3-SuperNode federation on loopback, against the same federation simulated.

    python benchmarks/deploy_rounds.py                      # 4 rounds, results/deploy-rounds.json
    python benchmarks/deploy_rounds.py --rounds 6 --name deploy-rounds-6

The federation is the one ``docs/deploy.md`` describes, on one machine: ``fedplug certificates``,
``fedplug superlink`` with TLS and SuperNode authentication, three registered keys, three
``fedplug supernode numpy --data embedded --partition-id I --num-partitions 3``, and
``fedplug run numpy --superlink ... --model mlp``. The same run config is then simulated
(``fedplug run numpy --nodes 3 --model mlp``). Each round's wall time is the ServerApp's own
(``metrics.json``: train, evaluate and centralized evaluation, the checkpoint written); round 0
only evaluates the initial model. At the end every command gets SIGINT, as Ctrl-C, and the
seconds each took to end are recorded too.

Results go to ``benchmarks/results/<name>.json`` with the machine and its load; a table is printed.
This is not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import machine  # noqa: E402

FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
NODES = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(path: Path, text: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.is_file() else ""):
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"{path.name}: no '{text}' ({process.poll()=}):\n{path.read_text(errors='replace')}")
        time.sleep(0.1)


def idle_cpu(processes: list[subprocess.Popen[bytes]], seconds: float = 10.0) -> float:
    """CPU seconds per second that ``processes`` and all their descendants use while the federation is idle."""
    import psutil

    def total() -> float:
        used = 0.0
        for process in processes:
            try:
                parent = psutil.Process(process.pid)
                for proc in [parent, *parent.children(recursive=True)]:
                    times = proc.cpu_times()
                    used += times.user + times.system
            except psutil.Error:
                continue
        return used

    before = total()
    time.sleep(seconds)
    return round((total() - before) / seconds, 3)


def rounds_of(out: Path) -> list[float]:
    return [float(r["seconds"]) for r in json.loads((out / "metrics.json").read_text())["rounds"]]


def node_seconds(out: Path) -> list[float]:
    """Each round's slowest node's own train time plus its own evaluate time (its ClientApp's work)."""
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    return [round(r.get("train-slowest-seconds", 0) + r.get("evaluate-slowest-seconds", 0), 3) for r in rounds]


def deployed(folder: Path, rounds: int, env: dict[str, str], threads: str) -> dict[str, Any]:
    """The federation through fedplug's commands; its rounds' seconds and how long each command took to stop."""
    port = free_port()
    address = f"127.0.0.1:{port}"

    def run(*args: str) -> str:
        done = subprocess.run([FEDPLUG, *args], capture_output=True, text=True, env=env, cwd=folder, check=False)
        if done.returncode:
            raise SystemExit(f"fedplug {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(name: str, *args: str, threads: str = "") -> tuple[subprocess.Popen[bytes], Path]:
        output = folder / f"{name}.out"
        own = {**env, "OMP_NUM_THREADS": threads} if threads else env
        with open(output, "wb") as file:
            process = subprocess.Popen([FEDPLUG, *args], stdout=file, stderr=subprocess.STDOUT, env=own, cwd=folder)
        return process, output

    run("certificates", "certs", "--host", "127.0.0.1", "--supernodes", str(NODES))
    commands: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        link, link_out = start("superlink", "superlink", "--certificates", "certs", "--host", "127.0.0.1",
                               "--port", str(port))  # fmt: skip
        commands.append(("superlink", link))
        wait_for(link_out, "SuperLink ready", 120, link)
        run("register", *(f"certs/supernode-{i}.pub" for i in range(1, NODES + 1)), "--superlink", address,
            "--ca-cert", "certs/ca.crt")  # fmt: skip
        for i in range(NODES):
            node, node_out = start(
                f"supernode-{i + 1}", "supernode", "numpy", "--superlink", address, "--ca-cert", "certs/ca.crt",
                "--key", f"certs/supernode-{i + 1}.key", "--data", "embedded", "--partition-id", str(i),
                "--num-partitions", str(NODES), "--log", f"supernode-{i + 1}.log", threads=threads,
            )  # fmt: skip
            commands.append((f"supernode-{i + 1}", node))
            wait_for(node_out, "connected to", 120, node)
        idle = idle_cpu([process for _, process in commands])
        out = folder / "deployed"
        started = time.monotonic()
        run("run", "numpy", "--superlink", address, "--ca-cert", "certs/ca.crt", "--model", "mlp",
            "--rounds", str(rounds), "--out", str(out))  # fmt: skip
        total = time.monotonic() - started
        seconds, own = rounds_of(out), node_seconds(out)
    finally:
        stops: dict[str, float] = {}
        began = time.monotonic()
        for _, process in commands:  # Ctrl-C, as a person would
            process.send_signal(signal.SIGINT)
        for name, process in commands:
            try:
                process.wait(timeout=60)
                stops[name] = round(time.monotonic() - began, 2)
            except subprocess.TimeoutExpired:
                process.kill()
                stops[name] = float("inf")
    return {
        "rounds": seconds,
        "node-seconds": own,
        "node-threads": threads or "default",
        "run-command-seconds": round(total, 2),
        "idle-cpu-cores": idle,
        "sigint-stop-seconds": stops,
    }


def simulated(folder: Path, rounds: int, env: dict[str, str]) -> dict[str, Any]:
    out = folder / "simulated"
    started = time.monotonic()
    done = subprocess.run(
        [FEDPLUG, "run", "numpy", "--nodes", str(NODES), "--model", "mlp", "--rounds", str(rounds), "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=folder, check=False,
    )  # fmt: skip
    if done.returncode:
        raise SystemExit(done.stdout + done.stderr)
    return {
        "rounds": rounds_of(out),
        "node-seconds": node_seconds(out),
        "run-command-seconds": round(time.monotonic() - started, 2),
    }


def summary(seconds: list[float]) -> dict[str, float]:
    """Round 1 and the rounds after it (round 0 only evaluates the initial model)."""
    later = seconds[2:] or [float("nan")]
    return {"first": seconds[1], "later-max": max(later), "later-mean": sum(later) / len(later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--name", default="deploy-rounds", help="results file name")
    parser.add_argument(
        "--node-threads",
        default="1",
        help="OMP_NUM_THREADS of each SuperNode ('' for numpy's default: every core). A simulated node has 1 CPU "
        "(--client-cpus 1); three SuperNodes on one 2-core machine with every core each slow each other down",
    )
    options = parser.parse_args()
    load = os.getloadavg()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FEDPLUG_PLUGINS": ""}
    with tempfile.TemporaryDirectory(prefix="fedplug-deploy-bench-") as folder:
        env["FLWR_HOME"] = str(Path(folder) / "flwr-home-unused")
        runs = {"deployed": deployed(Path(folder), options.rounds, env, options.node_threads)}
        runs["simulated"] = simulated(Path(folder), options.rounds, env)
    for run in runs.values():
        run.update(summary(run["rounds"]))
    ratio = runs["deployed"]["later-mean"] / runs["simulated"]["later-mean"]
    results = HERE / "results" / f"{options.name}.json"
    results.write_text(
        json.dumps({"machine": machine(load), "load-average-after": os.getloadavg(), **runs, "ratio": ratio}, indent=2)
        + "\n"
    )
    print("| engine | round 1 s | later rounds: mean s | max s | every round s | nodes' own s |")
    print("|---|---:|---:|---:|---|---|")
    for name, run in runs.items():
        every, own = (" ".join(f"{s:.2f}" for s in run[key]) for key in ("rounds", "node-seconds"))
        print(f"| {name} | {run['first']:.2f} | {run['later-mean']:.2f} | {run['later-max']:.2f} | {every} | {own} |")
    print(f"\ndeployed / simulated (later rounds): {ratio:.1f}x")
    print(f"SIGINT to each command until it ended: {runs['deployed']['sigint-stop-seconds']}")
    print(f"idle federation (SuperLink, 3 SuperNodes): {runs['deployed']['idle-cpu-cores']:.1%} of a core")
    print(results)


if __name__ == "__main__":
    main()
