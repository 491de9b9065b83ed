"""Time Flower's own quickstart-mlx app run with ``flwr run``: the baseline ``fedplug run mlx`` is compared with.

    python benchmarks/flower_baseline.py --repeat 3                    # Flower's defaults (2 cores per client)
    python benchmarks/flower_baseline.py --repeat 3 --client-cpus 1    # fedplug's default client resources

The app is ``benchmarks/flower-quickstart-mlx`` (Flower's quickstart-mlx tutorial, reading the 12,000
digits fedplug's default mlx run uses: see its README). Each run is what Flower 1.42 intends for a
local simulation: ``flwr run APP --stream`` on the default ``local`` SuperLink connection, which
starts a local SuperLink in simulation mode (``flower-superlink --simulation``) when none answers;
that SuperLink runs the app on the Simulation Engine (Ray) and ``--stream`` prints the ServerApp's
log until the run ends. Every run starts cold, from a fresh ``FLWR_HOME`` in a temporary folder
(never ``~/.flwr``), on free local ports, and with Flower's update check off (no network here).
The app's dependencies are installed beforehand, in this Python environment, as the tutorial says
(``pip install -e .``), so Flower's runtime installation of them (``uv sync`` into a new environment
for every run, on by default in 1.42) is off; ``--runtime-install`` turns it back on.

- total: command start to exit (the SuperLink's start, the run, the log stream's end)
- to-first-round: command start to the streamed ``[ROUND 2/N]`` line, i.e. the end of round 1 (as the
  log stream delivers it: a little late)
- started: command start to ``Successfully started run`` (the SuperLink is up and took the app)
- strategy: Flower's own ``Strategy execution finished in`` figure
- peak-rss: the largest sum of resident memory over the ``flwr`` process tree (SuperLink and Ray included)
- accuracy: the last round's aggregated federated evaluation accuracy (the nodes' test splits)

After each run the SuperLink and every process seen under it are stopped. Results go to
``benchmarks/results/<name>.json`` with the machine's description and the load average before the runs.
This is not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from bench import HERE, TreeMemory, machine

APP = HERE / "flower-quickstart-mlx"
BIN = Path(sys.executable).parent
ROUND_2 = re.compile(r"\[ROUND 2/\d+\]")
EVALUATED = re.compile(r"aggregate_evaluate: Received")
METRICS = re.compile(r"Aggregated MetricRecord: (\{.*\})")
STRATEGY = re.compile(r"Strategy execution finished in ([0-9.]+)s")


def free_port() -> int:
    """A TCP port nobody listens on now, on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Seen(threading.Thread):
    """Remembers every process under ``root`` while it runs (the SuperLink detaches from ``flwr``)."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.stopped = psutil.Process(root), interval, threading.Event()
        self.processes: dict[tuple[int, float], psutil.Process] = {}

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                for process in self.root.children(recursive=True):
                    self.processes.setdefault((process.pid, process.create_time()), process)
            except psutil.Error:
                return
            self.stopped.wait(self.interval)


def superlinks(home: Path) -> list[psutil.Process]:
    """The local SuperLinks ``flwr run`` started for ``home`` (their log file is under it)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = process.info["cmdline"] or []
        if any("flower-superlink" in part for part in line) and any(str(home) in part for part in line):
            found.append(process)
    return found


def stop(processes: list[psutil.Process]) -> int:
    """Terminate ``processes`` (and what runs under them), kill what is left after 10 s; how many there were."""
    alive = []
    for process in processes:
        try:
            alive += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    alive = [p for p in {p.pid: p for p in alive}.values() if p.is_running()]  # is_running checks the start time
    for process in alive:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, left = psutil.wait_procs(alive, timeout=10)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(left, timeout=5)
    return len(alive)


def measure(app: Path, nodes: int, client_cpus: float | None, runtime_install: bool, work: Path) -> dict[str, Any]:
    """One cold ``flwr run APP --stream``, timed; the SuperLink it started is stopped afterwards."""
    run = work / f"run-{len(list(work.glob('run-*')))}"
    home = run / "flwr-home"
    home.mkdir(parents=True)
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    if not runtime_install:
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    federation = [f"num-supernodes={nodes}"]
    if client_cpus is not None:
        federation.append(f"client-resources-num-cpus={client_cpus:g}")
    command = [str(BIN / "flwr"), "run", str(app), "--stream"]
    for option in federation:
        command += ["--federation-config", option]
    lines: list[tuple[float, str]] = []
    started = time.time()
    process = subprocess.Popen(
        command, cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    memory, seen = TreeMemory(process.pid), Seen(process.pid)
    memory.start()
    seen.start()
    assert process.stdout is not None
    for line in process.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    code = process.wait()
    ended = time.time()
    memory.stopped.set()
    seen.stopped.set()
    memory.join()
    seen.join()
    stopped = stop(superlinks(home) + list(seen.processes.values()))
    if code != 0:
        tail = "\n".join(line for _, line in lines[-20:])
        raise SystemExit(f"flwr run failed ({code}); the end of its output:\n{tail}")

    def first(pattern: re.Pattern[str]) -> float | None:
        return next((t - started for t, line in lines if pattern.search(line)), None)

    evaluated = _evaluate_metrics([line for _, line in lines])
    strategy = next((float(m.group(1)) for _, line in lines if (m := STRATEGY.search(line))), None)
    if not evaluated:
        raise SystemExit("flwr run logged no federated evaluation:\n" + "\n".join(line for _, line in lines[-20:]))
    return {
        "app": str(app.relative_to(HERE.parent)) if app.is_relative_to(HERE.parent) else str(app),
        "command": " ".join(command),
        "nodes": nodes,
        "client-cpus": client_cpus if client_cpus is not None else "flower default (2)",
        "runtime-dependency-installation": runtime_install,
        "rounds": len(evaluated),
        "started": first(re.compile("Successfully started run")),
        "to-first-round": first(ROUND_2),
        "strategy": strategy,
        "total": ended - started,
        "peak-rss-mb": memory.peak / 2**20,
        "accuracy": evaluated[-1]["accuracy"],
        "evaluate-loss": evaluated[-1]["loss"],
        "processes-stopped-after": stopped,
    }


def _evaluate_metrics(lines: list[str]) -> list[dict[str, float]]:
    """Each round's aggregated federated evaluation metrics, from the ServerApp's log."""
    found, evaluating = [], False
    for line in lines:
        if EVALUATED.search(line):
            evaluating = True
        elif evaluating and (match := METRICS.search(line)):
            found.append({k: float(v) for k, v in ast.literal_eval(match.group(1)).items()})
            evaluating = False
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", type=Path, default=APP, help="the Flower app folder (default: the quickstart)")
    parser.add_argument("--nodes", type=int, default=10, help="num-supernodes of the simulation (the quickstart's 10)")
    parser.add_argument(
        "--client-cpus", type=float, help="client-resources-num-cpus (default: Flower's, 2 cores per client)"
    )
    parser.add_argument(
        "--runtime-install", action="store_true", help="let Flower install the app's dependencies for every run (uv)"
    )
    parser.add_argument("--name", default="flower-quickstart-mlx", help="results file name")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the median run (by total) is kept")
    options = parser.parse_args()
    app, load = options.app.resolve(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="flower-baseline-") as folder:
        timed = []
        for _ in range(options.repeat):
            timed.append(measure(app, options.nodes, options.client_cpus, options.runtime_install, Path(folder)))
            run = timed[-1]
            print(
                f"total {run['total']:.1f} s, to round 1 {run['to-first-round']:.1f} s, accuracy {run['accuracy']:.2%}",
                flush=True,
            )
    median = sorted(timed, key=lambda run: run["total"])[len(timed) // 2]
    results = HERE / "results" / f"{options.name}.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"machine": machine(load), "runs": [median], "all-runs": timed}, indent=2) + "\n")
    print(f"median total {median['total']:.1f} s\n{results}")


if __name__ == "__main__":
    main()
