"""End to end on Flower's Simulation Engine: `fedplug run numpy`, its output, results and clean exit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedplug.testing.runs import check_results, processes_of, read_rounds


def test_run_numpy_end_to_end(run_fedplug, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    proc, out = run_fedplug(
        "numpy",
        "--rounds",
        "2",
        "--nodes",
        "4",
        "--run-config",
        "hidden-dims='64'",
        env={"HOME": str(home), "FEDPLUG_PLUGINS": ""},
    )
    rounds = check_results(out, ".npz")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["centralized-accuracy"] > rounds[1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"]
    assert rounds[2]["evaluate-accuracy"] > rounds[1]["evaluate-accuracy"]
    assert rounds[1]["train-nodes"] == 4 and rounds[1]["evaluate-nodes"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == "numpy" and config["num-supernodes"] == 4
    assert (out / "flower-app" / "pyproject.toml").is_file()
    with np.load(out / "weights.npz") as weights:  # the override reached server and clients alike
        assert weights["layers.0.weight"].shape == (64, 784)
    # the user sees progress and a summary, not Flower's, Ray's or the frameworks' logs
    assert "round   2 │ nodes 4 │ train" in proc.stdout and "summary" in proc.stdout
    for noise in ("INFO", "WARNING", "DEPRECATED", "Ray", "oneDNN", "absl"):
        assert noise not in proc.stdout + proc.stderr, f"'{noise}' reached the terminal"
    assert not (home / ".flwr").exists(), "fedplug wrote to ~/.flwr"
    assert processes_of(out) == [], "processes of the run outlived it"  # at once: no wait for a reaper
    assert (out / "metrics.png").stat().st_size > 0 and (out / "model.npz").is_file()
    timeline = json.loads((out / "timeline.json").read_text())
    # teardown (issue 29): the fast path ran (simulation.finish_and_exit), Ray's processes were ended by the simulation
    # process once the results were written, not by Flower's stopping and ray.shutdown()
    assert "simulation-exit" in timeline and "engine-stopped" not in timeline, timeline
    assert timeline["rounds-done"] <= timeline["simulation-exit"]


def test_failing_client_apps_end_the_run_with_one_line(tmp_path: Path) -> None:
    from fedplug.testing.runs import fedplug

    out = tmp_path / "failing"
    done = fedplug(
        "run", "failing_train", "--rounds", "5", "--nodes", "2", "--out", str(out),
        "--run-config", "max-failed-rounds=2", env={"FEDPLUG_PLUGINS": "failing"},
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    # the node's own error reaches the user, not a generic "the ClientApps failed"
    assert "no usable training result in 2 rounds in a row (last: round 2)" in lines[0]
    assert "train raised RuntimeError: train() is broken on purpose" in lines[0] and "simulation.log" in lines[0]
    assert "failed: 2 nodes: train raised RuntimeError" in done.stdout
    assert [r["round"] for r in read_rounds(out)] == [0, 1, 2]  # the failed rounds are recorded with their reasons
    assert read_rounds(out)[2]["train-failures"][0]["reason"].startswith("train raised RuntimeError")
    assert processes_of(out) == []


def test_other_strategy_and_partitioner_end_to_end(run_fedplug) -> None:
    _, out = run_fedplug(
        "numpy",
        "--rounds",
        "2",
        "--nodes",
        "3",
        "--strategy",
        "fedprox",
        "--partitioner",
        "dirichlet",
        "--run-config",
        "strategy.proximal-mu=0.1 partitioner.alpha=1.0 centralized-eval=false",
        env={"FEDPLUG_PLUGINS": ""},
    )
    rounds = check_results(out, ".npz")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert "centralized-accuracy" not in rounds[-1]
    assert rounds[2]["evaluate-accuracy"] > rounds[1]["evaluate-accuracy"]
    config = json.loads((out / "config.json").read_text())
    assert config["strategy.proximal-mu"] == 0.1 and config["partitioner"] == "dirichlet"


def test_training_that_diverges_stops_in_that_round_and_saves_nothing_non_finite(tmp_path: Path) -> None:
    from fedplug.testing.runs import fedplug

    out = tmp_path / "diverged"
    done = fedplug(
        "run", "numpy", "--rounds", "3", "--nodes", "2", "--out", str(out),
        "--run-config", "lr=1e30 hidden-dims='16'", env={"FEDPLUG_PLUGINS": ""},
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "training diverged in round 1" in lines[0] and "lower lr" in lines[0], done.stderr
    assert [r["round"] for r in read_rounds(out)] == [0, 1]
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    with np.load(out / "weights.npz") as weights:  # the last good global model, never a non-finite one
        assert all(np.isfinite(weights[key]).all() for key in weights.files)
    assert processes_of(out) == []


def test_the_default_run_learns(run_fedplug) -> None:
    """`fedplug run numpy` with no options learns on the embedded digits (docs/performance.md: the benchmark
    holds the 85% target; this test a softer floor)."""
    _, out = run_fedplug("numpy", env={"FEDPLUG_PLUGINS": ""})
    rounds = check_results(out, ".npz")
    assert rounds[-1]["centralized-accuracy"] >= 0.8, [r.get("centralized-accuracy") for r in rounds]
