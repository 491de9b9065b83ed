"""Time `fedplug run` step by step: start-up, rounds, per-round overhead, teardown, memory, efficiency.

    python benchmarks/bench.py numpy -- --rounds 5 --nodes 10     # one run config
    python benchmarks/bench.py --suite defaults                    # every installed backend's default run
    python benchmarks/bench.py --suite scale                       # numpy, 1,000 to 1,000,000 clients

Each run is a real ``fedplug run`` (Flower's Simulation Engine) in a fresh results folder. The
figures come from what every run records: ``timeline.json`` (when the engine was ready, when the
first ClientApp was called, when the rounds were done, when the engine stopped) and
``metrics.json`` (each round's wall time, the slowest node's own train and evaluate time, the
nodes' summed time), plus the whole process tree's memory, sampled here every 0.2 s.

- startup: command start to Ray ready; first-call: Ray ready to the first ClientApp call
- first-round: round 1's wall time (it includes the workers' start-up: imports, data);
  to-first-round: command start to the end of round 1
- per-round: mean wall time of rounds 2..N (of round 1 in a one-round run); overhead: the same minus
  the slowest node's own train and evaluate time (what Flower, Ray, the messages, server-side
  evaluation and results writing cost, when every node has a core); overhead/cores: the same minus
  the larger of that and the nodes' summed own time over the cores (with more nodes than cores,
  nodes run one after another)
- teardown: rounds done to the command's exit (in the JSON also its parts, and with ``--repeat`` every run's
  teardown and load); total: command start to exit
- peak-rss: the largest sum of resident memory over every process of the run (Ray's included)
- efficiency: the nodes' summed own time / (rounds' wall time x cores)

Results go to ``benchmarks/results/<name>.json`` with a description of the machine; a table is printed.
This is not part of the test suite: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
FIRST_PARTY = ("numpy", "torch", "keras", "jax", "mlx", "mxnet")
SCALE = [  # (clients, fraction per round, rounds, rows per client): numpy backend, the shared mlp
    (1_000, 0.1, 5, 5),
    (10_000, 0.1, 5, 5),
    (100_000, 0.01, 5, 3),
    (1_000_000, 0.001, 2, 2),
]
"""The scale series. Its data is the embedded training digits repeated until each client holds about
``rows per client`` examples (train + test; at 1,000,000 clients the digits are downsampled to 14x14)."""


def scale_dataset(folder: Path, rows: int, size: int = 28) -> Path:
    """The embedded training digits (12,000) repeated to ``rows`` rows as a local parquet file; ``size`` 14:
    downsampled to 14x14 (the mean of each 2x2 block), for a million clients in little memory."""
    from importlib import resources

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    with resources.files("fedplug.data").joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        images, labels = npz["train_images"], npz["train_labels"]
    if size != images.shape[1]:
        factor = images.shape[1] // size
        blocks = images.reshape(len(images), size, factor, size, factor).astype(np.float32)
        images = blocks.mean(axis=(2, 4)).round().astype(np.uint8)
    copies = -(-rows // len(labels))
    images, labels = np.tile(images, (copies, 1, 1))[:rows], np.tile(labels, copies)[:rows]
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), images.shape[2])
    column = pa.FixedSizeListArray.from_arrays(flat, images.shape[1])
    path = folder / f"digits-{rows}x{size}.parquet"
    pq.write_table(pa.table({"image": column, "label": pa.array(labels.astype(np.int64))}), path)
    return path


def suite(name: str, folder: Path) -> list[tuple[str, list[str]]]:
    """(backend, extra arguments) of every run of a named suite."""
    if name == "defaults":
        listed = subprocess.run([FEDPLUG, "list", "--json"], capture_output=True, text=True, check=True).stdout
        ok = {entry["name"] for entry in json.loads(listed) if entry["status"] == "ok"}
        return [(backend, []) for backend in FIRST_PARTY if backend in ok]
    if name == "scale":
        runs = []
        for clients, fraction, rounds, per_client in SCALE:
            if SCALE_ONLY and clients not in SCALE_ONLY:
                continue
            data = scale_dataset(folder, clients * per_client, 14 if clients >= 1_000_000 else 28)
            share = ["--fraction-train", str(fraction), "--fraction-evaluate", str(fraction)]
            rest = ["--dataset", str(data), "--run-config", "centralized-eval=false"]
            runs.append(("numpy", ["--nodes", str(clients), "--rounds", str(rounds), *share, *rest]))
        return runs
    raise SystemExit(f"unknown suite '{name}': choose defaults or scale")


SCALE_ONLY = {int(n) for n in os.environ.get("FEDPLUG_BENCH_CLIENTS", "").split(",") if n}
"""``FEDPLUG_BENCH_CLIENTS=1000,10000``: run only these points of the scale series."""


class TreeMemory(threading.Thread):
    """Samples the summed resident memory of a process and all its descendants; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.peak, self.stopped = psutil.Process(pid), interval, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    total += process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            self.stopped.wait(self.interval)


def measure(backend: str, args: list[str], work: Path) -> dict[str, Any]:
    """One ``fedplug run BACKEND ARGS``, timed."""
    out = work / f"{backend}-{len(list(work.glob(f'{backend}-*')))}"
    command = [FEDPLUG, "run", backend, "--out", str(out), *args]
    load, started = os.getloadavg()[0], time.time()
    with open(work / "output.txt", "ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=output)
        memory = TreeMemory(process.pid)
        memory.start()
        code = process.wait()
    ended = time.time()
    memory.stopped.set()
    memory.join()
    if code != 0:
        raise SystemExit(f"fedplug run {backend} {' '.join(args)} failed ({code}): see {work / 'output.txt'}")
    timeline = json.loads((out / "timeline.json").read_text())
    records = json.loads((out / "metrics.json").read_text())["rounds"]
    rounds = [r for r in records if r["round"] > 0]
    config = json.loads((out / "config.json").read_text())
    later = rounds[1:] or rounds
    cores = psutil.cpu_count() or 1
    slowest = [r.get("train-slowest-seconds", 0) + r.get("evaluate-slowest-seconds", 0) for r in later]
    overheads = [r["seconds"] - s for r, s in zip(later, slowest)]
    # with more nodes than cores, nodes run one after another: their summed time over the cores bounds the round
    parallel = [r["seconds"] - max(s, r.get("compute-seconds", 0) / cores) for r, s in zip(later, slowest)]
    kinds = ("centralized-accuracy", "evaluate-accuracy")
    accuracy = next((r[k] for r in reversed(rounds) for k in kinds if k in r), None)
    return {
        "backend": backend,
        "args": args,
        "model": config["model"],
        "nodes": config["num-supernodes"],
        "rounds": len(rounds),
        "train-per-round": sum(r.get("train-nodes", 0) for r in rounds) / len(rounds),
        # client updates (trained and screened) per second of the rounds' wall time
        "updates-per-s": sum(r.get("train-nodes", 0) for r in rounds) / sum(r["seconds"] for r in rounds),
        "load-1min-before": round(load, 2),
        "startup": timeline["engine-ready"] - started,
        "first-call": timeline["first-client-call"] - timeline["engine-ready"],
        "first-round": rounds[0]["seconds"],
        "to-first-round": timeline["server-start"] - started + records[0]["seconds"] + rounds[0]["seconds"],
        "per-round": sum(r["seconds"] for r in later) / len(later),
        "overhead": sum(overheads) / len(overheads),
        "overhead-parallel": sum(parallel) / len(parallel),
        "teardown": ended - timeline["rounds-done"],
        # teardown's parts: the simulation process (plot, status, Ray's processes ended) and the command's end after it
        **teardown_parts(out, timeline, ended),
        "total": ended - started,
        "peak-rss-mb": memory.peak / 2**20,
        "efficiency": sum(r.get("compute-seconds", 0) for r in rounds) / (sum(r["seconds"] for r in rounds) * cores),
        "accuracy": accuracy,
        "evaluate-accuracy": next((r["evaluate-accuracy"] for r in reversed(rounds) if "evaluate-accuracy" in r), None),
    }


def teardown_parts(out: Path, timeline: dict[str, float], ended: float) -> dict[str, float]:
    """Where a teardown went: rounds done to status ``finished`` written (model, plot), to the simulation process's
    exit (Ray's processes ended meanwhile), and from there to the command's exit; empty on the graceful path."""
    if "simulation-exit" not in timeline:
        return {}
    status = (out / "status.json").stat().st_mtime
    return {
        "teardown-to-status": status - timeline["rounds-done"],
        "teardown-to-simulation-exit": timeline["simulation-exit"] - timeline["rounds-done"],
        "teardown-command-end": ended - timeline["simulation-exit"],
    }


def machine(load: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """What the figures were measured on (with ``load``, the load average before the runs)."""
    cpu = platform.processor()
    with open("/proc/cpuinfo") if Path("/proc/cpuinfo").is_file() else open(os.devnull) as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    versions = {}
    names = ("fedplug-core", "flwr", "ray", "numpy", "torch", "tensorflow-cpu", "keras", "jax", "flax", "mlx", "mxnet")
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory-gb": round(psutil.virtual_memory().total / 2**30, 1),
        "system": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
        **({"load-average-before": [round(value, 2) for value in load]} if load else {}),
    }


COLUMNS = {
    "backend": ("backend", "{}"),
    "nodes": ("nodes", "{}"),
    "train-per-round": ("train/round", "{:.0f}"),
    "updates-per-s": ("updates/s", "{:.0f}"),
    "startup": ("start-up s", "{:.1f}"),
    "first-call": ("1st call s", "{:.1f}"),
    "first-round": ("round 1 s", "{:.1f}"),
    "to-first-round": ("to round 1 s", "{:.1f}"),
    "per-round": ("per round s", "{:.2f}"),
    "overhead": ("overhead s", "{:.2f}"),
    "overhead-parallel": ("overhead/cores s", "{:.2f}"),
    "teardown": ("teardown s", "{:.1f}"),
    "total": ("total s", "{:.1f}"),
    "peak-rss-mb": ("peak MB", "{:.0f}"),
    "efficiency": ("efficiency", "{:.0%}"),
    "accuracy": ("accuracy", "{:.2%}"),
    "load-1min-before": ("load", "{:.1f}"),
}


def table(runs: list[dict[str, Any]]) -> str:
    """A Markdown table of the runs (docs/performance.md's)."""
    lines = ["| " + " | ".join(label for label, _ in COLUMNS.values()) + " |", "|" + "---:|" * len(COLUMNS)]
    for run in runs:
        cells = ["-" if run.get(key) is None else form.format(run[key]) for key, (_, form) in COLUMNS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", nargs="?", help="one run: the backend (arguments for fedplug run after --)")
    parser.add_argument("--suite", choices=["defaults", "scale"], help="a named series of runs instead")
    parser.add_argument("--name", help="results file name (default: the suite's, or 'run')")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each config; the median run is kept")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    options = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if bool(options.suite) == bool(options.backend):
        parser.error("give a backend or --suite")
    runs, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedplug-bench-") as folder:
        configs = suite(options.suite, Path(folder)) if options.suite else [(options.backend, extra)]
        for backend, args in configs:
            timed = [measure(backend, args, Path(folder)) for _ in range(options.repeat)]
            timed.sort(key=lambda run: run["total"])
            runs.append(timed[len(timed) // 2])
            if options.repeat > 1:  # every run's teardown and load, not only the median run's
                runs[-1]["teardowns"] = [[round(t["teardown"], 3), t["load-1min-before"]] for t in timed]
            print(table(runs[-1:]).splitlines()[-1], flush=True)
    name = options.name or options.suite or "run"
    results = HERE / "results" / f"{name}.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"machine": machine(load), "runs": runs}, indent=2) + "\n")
    print(f"\n{table(runs)}\n\n{results}")


if __name__ == "__main__":
    main()
