"""Profile a running ``fedplug run`` with py-spy: where a round's wall time and CPU go, thread by thread.

    python benchmarks/profile_run.py numpy --name per-round-10-nodes -- --nodes 10 --rounds 80
    python benchmarks/profile_run.py numpy --after-round 2 --name scale-1000-nodes-later-rounds -- \\
        --nodes 1000 --rounds 12 --fraction-train 0.1 --fraction-evaluate 0.1

It starts the run, waits until ``--after-round`` rounds are finished (start-up is not what is profiled),
then samples for ``--seconds`` the simulation process (the ServerApp and Flower's Simulation Engine
threads) and one Ray worker (the ClientApps), twice each: wall time (idle samples included: what a
thread waits on) and CPU (running samples only). The run is then stopped (SIGTERM, as a user's
Ctrl-C). The summary, each thread's share and its heaviest frames, goes to
``benchmarks/results/profiles/<name>.txt``.

Needs py-spy (``pip install py-spy``) and permission to read other processes' memory (ptrace).
This is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
from bench import FEDPLUG, HERE

PY_SPY = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def rounds_done(out: Path) -> int:
    """Rounds finished so far by the run writing into ``out``."""
    try:
        return max(r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError):
        return -1


def processes(root: psutil.Process, timeout: float = 120) -> tuple[psutil.Process, psutil.Process]:
    """The run's simulation process and one of its Ray workers serving ClientApps (once they have started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        simulation = worker = None
        for process in root.children(recursive=True):
            try:
                line = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if "fedplug.simulation" in line and simulation is None:
                simulation = process
            if "ClientAppActor" in line and worker is None:
                worker = process
        if simulation is not None and worker is not None:
            return simulation, worker
        time.sleep(0.2)
    raise SystemExit("the run's simulation process or Ray worker was not found")


def record(pid: int, seconds: float, idle: bool, path: Path) -> subprocess.Popen[bytes]:
    """Start py-spy sampling ``pid`` for ``seconds`` into ``path`` (raw: one folded stack and count per line)."""
    flags = ["--idle"] if idle else []
    command = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw"]
    command += ["--threads", "--nonblocking", *flags, "--output", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summary(path: Path, title: str, frames: int) -> str:
    """Each thread's share of the samples and, for the busiest threads, their heaviest frames (inclusive)."""
    threads: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *calls = stack.split(";")
        n = int(count)
        total += n
        threads[thread] += n
        for call in set(calls):
            inclusive.setdefault(thread, Counter())[call] += n
    lines = [f"## {title}: {total} samples"]
    for thread, n in threads.most_common():
        lines.append(f"{100 * n / total:5.1f}%  {thread}")
    for thread, n in threads.most_common(3):
        lines.append(f"\n### {thread} ({100 * n / total:.1f}%): frames, as shares of this thread's samples")
        for call, m in inclusive[thread].most_common(frames):
            lines.append(f"{100 * m / n:5.1f}%  {call}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", help="the backend (arguments for fedplug run after --)")
    parser.add_argument("--name", default="profile", help="summary file name")
    parser.add_argument("--after-round", type=int, default=3, help="rounds to finish before sampling")
    parser.add_argument("--seconds", type=float, default=10, help="how long to sample")
    parser.add_argument("--frames", type=int, default=25, help="frames listed per thread")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    options = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if PY_SPY is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="fedplug-profile-") as folder:
        work = Path(folder)
        out = work / "run"
        with open(work / "output.txt", "wb") as output:
            command = [FEDPLUG, "run", options.backend, "--out", str(out), *extra]
            run = subprocess.Popen(command, stdout=output, stderr=output)
        try:
            while rounds_done(out) < options.after_round:
                if run.poll() is not None:
                    raise SystemExit(f"the run ended before round {options.after_round}: {work / 'output.txt'}")
                time.sleep(0.2)
            simulation, worker = processes(psutil.Process(run.pid))
            first = rounds_done(out)
            samplers = {
                (who, idle): record(process.pid, options.seconds, idle, work / f"{who}-{idle}.txt")
                for who, process in (("simulation process", simulation), ("Ray worker", worker))
                for idle in (True, False)
            }
            for sampler in samplers.values():
                sampler.wait()
            sampled = rounds_done(out) - first
        finally:
            run.send_signal(signal.SIGTERM)  # fedplug stops its simulation and Ray, keeping the finished rounds
            run.wait()
        parts = [
            f"# fedplug run {options.backend} {' '.join(extra)}",
            f"{options.seconds:g} s sampled after round {first}, {sampled} rounds finished meanwhile "
            f"({options.seconds / max(sampled, 1):.2f} s per round)",
        ]
        for (who, idle), _ in samplers.items():
            kind = "wall time (idle samples included)" if idle else "CPU (running samples only)"
            parts.append(summary(work / f"{who}-{idle}.txt", f"{who}, {kind}", options.frames))
    target = HERE / "results" / "profiles" / f"{options.name}.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n\n".join(parts) + "\n")
    print(target)


if __name__ == "__main__":
    main()
