"""CPU time of fedplug's data preparation, each stage cold in a fresh process; prints JSON.

Usage: ``python benchmarks/data_layer.py`` (with the fedplug to measure first on the path);
``python benchmarks/data_layer.py --run`` runs ``fedplug run numpy`` with 1,000 nodes, 10% sampled
per round, 3 rounds, and reports its wall time, the CPU time and the peak summed RSS of all its processes (sampled
every 0.5 s).

Stages, as a ``fedplug run`` meets them on the embedded digits:

- ``cli``: the CLI's pre-run data checks (dataset spec, partitioner, and, where the data layer
  offers it, the per-run partition plan shared with the other processes);
- ``server``: the server process's data (data spec and the held-out set);
- ``worker``: one Ray worker cutting every node's partition (the first cut includes loading the
  dataset in that process), and the mean CPU per later partition.

``total`` is what one run spends: cli + server + 2 workers (2 cores) each cutting the partitions
they are given (all of them in the worst case). Configurations: the default ``fedplug run mlx``
(10 nodes), ``--nodes 2`` (the torch quickstart), and 1,000 nodes with 10% sampled per round for
3 rounds (each worker cuts 150 partitions; peak RSS of that worker is reported too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

STAGE = r"""
import json, os, resource, sys, time
import numpy as np
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend

stage, nodes, cuts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = resolve(NumpyBackend(), {"num-supernodes": nodes, "out": os.environ["FEDPLUG_RUN_DIR"]})
start = time.process_time()
import fedplug.data as data
result = {}
if stage == "cli":
    if hasattr(data, "check_data"):
        data.check_data(config)
        data.share_run_data(config, os.environ["FEDPLUG_RUN_DIR"], watched=False)
    else:
        data.data_spec(config)
        data.make_partitioner(config, nodes)
elif stage == "server":
    data.data_spec(config)
    data.load_centralized(config)
else:
    data.data_spec(config)
    data.load_partition(config, 0, nodes)
    result["first"] = time.process_time() - start
    step = max(1, nodes // cuts)
    later = time.process_time()
    for pid in range(step, nodes, step)[: cuts - 1]:
        data.load_partition(config, pid, nodes)
    result["per_partition"] = (time.process_time() - later) / max(1, min(cuts - 1, len(range(step, nodes, step))))
result["cpu"] = time.process_time() - start
result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def stage(name: str, nodes: int, cuts: int, run_dir: str) -> dict[str, float]:
    env = {**os.environ, "FEDPLUG_RUN_DIR": run_dir, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", STAGE, name, str(nodes), str(cuts)], capture_output=True, text=True, env=env, check=True
    )
    return {k: round(v, 4) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def measure(nodes: int, cuts: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="fedplug-bench-") as run_dir:
        cli = stage("cli", nodes, cuts, run_dir)
        server = stage("server", nodes, cuts, run_dir)
        worker = stage("worker", nodes, cuts, run_dir)
    total = cli["cpu"] + server["cpu"] + 2 * worker["cpu"]
    return {
        "nodes": nodes,
        "cuts_per_worker": cuts,
        "cli": cli,
        "server": server,
        "worker": worker,
        "total_cpu": round(total, 3),
    }


def whole_run(args: list[str]) -> dict[str, object]:
    """Wall time, CPU time and peak summed RSS of every process of a real ``fedplug run numpy ARGS``."""
    import time
    from pathlib import Path

    import psutil

    with tempfile.TemporaryDirectory(prefix="fedplug-bench-") as folder:
        out = Path(folder) / "run"
        command = [str(Path(sys.executable).with_name("fedplug")), "run", "numpy", "--out", str(out), *args]
        started, peak, cpu = time.monotonic(), 0.0, {}
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None:
            total = 0
            for proc in psutil.process_iter():
                try:
                    if proc.pid == process.pid or proc.environ().get("FEDPLUG_RUN_DIR") == str(out.resolve()):
                        total += proc.memory_info().rss
                        times = proc.cpu_times()
                        cpu[proc.pid] = times.user + times.system
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            peak = max(peak, total / 2**20)
            time.sleep(0.5)
        rounds = json.loads((out / "metrics.json").read_text())["rounds"] if (out / "metrics.json").exists() else []
    return {
        "args": " ".join(args),
        "exit": process.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "peak_rss_mb": round(peak),
        "cpu_s": round(sum(cpu.values()), 1),
        "round_seconds": [r.get("seconds") for r in rounds],
        "train_nodes": [r.get("train-nodes") for r in rounds],
    }


def main() -> None:
    import fedplug.data

    if "--run" in sys.argv:  # the real thing: 1,000 nodes, 10% sampled per round
        args = "--nodes 1000 --fraction-train 0.1 --fraction-evaluate 0.1 --rounds 3 --run-config hidden-dims='32'"
        print(json.dumps(whole_run(args.split()), indent=1))
        return
    runs = {
        "mlx-default-10-nodes": measure(10, 10),
        "torch-2-nodes": measure(2, 2),
        "1000-nodes-10pct-3-rounds": measure(1000, 150),
    }
    print(json.dumps({"data_layer": os.path.dirname(fedplug.data.__file__), **runs}, indent=1))


if __name__ == "__main__":
    main()
