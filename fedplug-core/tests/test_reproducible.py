"""Same seed, same bits; a run killed with SIGKILL continues where it stopped, bit-identical (numpy backend)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedplug.testing.runs import assert_killed_run_resumes_bit_identical, assert_same_run, fedplug, read_rounds

QUIET = {"FEDPLUG_PLUGINS": ""}
SMALL = ["--nodes", "4", "--fraction-train", "0.5"]
ARGS = {  # the fedadam runs also evaluate only every 4th round (and the last)
    "fedavg": [*SMALL, "--run-config", "hidden-dims='16'", "--strategy", "fedavg", "--seed", "3"],
    "fedadam": [*SMALL, "--run-config", "hidden-dims='16' eval-every=4", "--strategy", "fedadam", "--seed", "3"],
}


def run(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = fedplug("run", "numpy", "--out", str(out), *args, env=QUIET)
    assert done.returncode == 0, f"fedplug run failed:\n{done.stdout}\n{done.stderr}"
    return done


def weights(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as saved:
        return {key: saved[key] for key in saved.files}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted 6-round runs, one per strategy."""
    root = tmp_path_factory.mktemp("reference")
    runs = {}
    for strategy in ("fedavg", "fedadam"):
        runs[strategy] = root / strategy
        run(runs[strategy], "--rounds", "6", *ARGS[strategy])
    return runs


def test_same_seed_gives_the_same_bits_and_another_seed_does_not(reference, tmp_path: Path) -> None:
    # again with one SuperNode per client (the reference serves its clients in cohorts): the same bits
    again = tmp_path / "again"
    run(again, "--rounds", "6", *[arg.replace("'16'", "'16' cohorts=false") for arg in ARGS["fedavg"]])
    assert_same_run(reference["fedavg"], again, "model.npz")
    assert json.loads((again / "config.json").read_text())["cohorts"] is False
    rounds = read_rounds(again)
    assert all(len(r["train-partitions"]) == 2 for r in rounds[1:])  # fraction 0.5 of 4 nodes
    assert len({tuple(r["train-partitions"]) for r in rounds[1:]}) > 1, "every round drew the same nodes"
    other = tmp_path / "other-seed"
    run(other, "--rounds", "2", *ARGS["fedavg"], "--seed", "4")
    assert not np.array_equal(
        weights(other / "weights.npz")["layers.0.weight"], weights(again / "weights.npz")["layers.0.weight"]
    )


def test_each_evaluation_travels_with_the_next_rounds_training(reference) -> None:
    """fold-evaluation (fedplug.folding): every evaluated round but the last, on either path (cohorts or not)."""
    assert [r.get("evaluate-folded") for r in read_rounds(reference["fedavg"])] == [None] + [True] * 5 + [None]
    fedadam = read_rounds(reference["fedadam"])  # eval-every=4: round 4, and the last alone
    assert [r["round"] for r in fedadam if r.get("evaluate-folded")] == [4]


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_killed_run_resumes_bit_identical(reference, strategy: str) -> None:
    args = [*ARGS[strategy], "--rounds", "6"]
    resumed = assert_killed_run_resumes_bit_identical("numpy", reference[strategy], args, "model.npz", QUIET, after=3)
    killed = reference[strategy].with_name(f"{strategy}-killed")
    assert "round   6" in resumed.stdout and "round   1" not in resumed.stdout  # only the new rounds run
    assert json.loads((killed / "config.json").read_text())["num-server-rounds"] == 6


def test_eval_every_evaluates_the_initial_model_every_nth_round_and_the_last(reference) -> None:
    rounds = read_rounds(reference["fedadam"])  # eval-every=4 over 6 rounds (its killed twin resumes identical)
    assert [r["round"] for r in rounds if "centralized-accuracy" in r] == [0, 4, 6]
    assert [r["round"] for r in rounds if "evaluate-accuracy" in r] == [4, 6]
    assert all("train-accuracy" in r for r in rounds[1:])


def test_resume_refuses_what_would_change_the_experiment(reference, tmp_path: Path) -> None:
    finished = reference["fedavg"]
    cases = [
        (["--resume", str(finished)], "holds a finished run (6 rounds): extend it with --rounds N"),
        (["--resume", str(finished), "--rounds", "4"], "has finished 6 rounds already"),
        (["--resume", str(finished), "--nodes", "3"], "--nodes would change the experiment"),
        (["--resume", str(finished), "--run-config", "lr=0.5"], "--run-config would change the experiment"),
        (["torch", "--resume", str(finished), "--rounds", "8"], "holds a 'numpy' run, not 'torch'"),
        (["--resume", str(tmp_path)], "is not a fedplug run folder"),
    ]
    for args, hint in cases:
        done = fedplug("run", *args, env=QUIET)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and hint in lines[0], (args, done.stderr)


def test_a_finished_run_can_be_extended(reference, tmp_path: Path) -> None:
    import shutil

    extended = tmp_path / "extended"
    shutil.copytree(reference["fedavg"], extended)
    done = fedplug("run", "--resume", str(extended), "--rounds", "7", env=QUIET)
    assert done.returncode == 0, done.stderr
    assert [r["round"] for r in read_rounds(extended)] == list(range(8))
    assert json.loads((extended / "config.json").read_text())["num-server-rounds"] == 7
