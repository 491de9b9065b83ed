"""A run imports only what it uses, and its workers' native thread pools fit their CPUs.

With every backend installed, Flower's Simulation Engine would import TensorFlow (and with it
Keras and JAX) in the simulation process and in every Ray worker: seconds of start-up and
hundreds of MB each, for runs that never use them. And NumPy's BLAS, loaded before Ray sizes a
worker's thread pools, would start one thread per core in every worker: on a busy machine each small
matrix product then waits on threads the other workers' cores are running.
"""

from __future__ import annotations

import json
from pathlib import Path


def test_a_numpy_run_imports_no_framework_in_any_of_its_processes(run_fedplug, tmp_path: Path) -> None:
    probes = tmp_path / "probes"
    probes.mkdir()
    run_fedplug(
        "probe", "--rounds", "1", "--nodes", "2", "--run-config", "hidden-dims='16'",
        env={"FEDPLUG_PLUGINS": "probe", "FEDPLUG_PROBE_DIR": str(probes)},
    )  # fmt: skip
    seen = {path.stem: json.loads(path.read_text()) for path in probes.glob("*.json")}
    assert len(seen) >= 2, f"the probe ran in too few processes: {seen}"  # the ServerApp's and a Ray worker
    assert all(process["frameworks"] == [] for process in seen.values()), seen
    workers = [process for process in seen.values() if process["worker"]]
    assert workers, f"no Ray worker among the probed processes: {seen}"
    # --client-cpus 1 (the default): one BLAS thread per worker, as Ray would size it for the client
    assert all(process["blas-threads"] == [1] for process in workers), seen
