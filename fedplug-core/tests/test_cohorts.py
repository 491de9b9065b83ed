"""Cohorts: a few simulated SuperNodes serve many clients each, and nothing a user sees changes but the time.

The cohort path (``cohorts=true``, the default) against one SuperNode per client (``cohorts=false``,
Flower's usual simulation): the same global weights bit for bit and the same metrics.json (timings
aside); a failing client inside a cohort is reported as that client's failure; a run killed on the
cohort path resumes bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedplug.testing.runs import assert_killed_run_resumes_bit_identical, assert_same_run, fedplug, read_rounds

PLUGINS: dict[str, str] = {}  # the test plugins' backends: failing_train
BROKEN = "train raised RuntimeError: train() is broken on purpose"
# 100 clients, 10 train and 5 evaluate per round (8 cohorts on 2 workers serve a few each); partitions 0-29
# train with a backend whose train() raises: their cohorts serve clients that train fine too
ARGS = [
    "--nodes", "100", "--rounds", "3", "--fraction-train", "0.1", "--fraction-evaluate", "0.05", "--seed", "7",
    "--run-config", "hidden-dims='16' centralized-eval=false node-backends='0-29:failing_train'",
]  # fmt: skip


def run(out: Path, *args: str) -> None:
    done = fedplug("run", "numpy", "--out", str(out), *args, env=PLUGINS)
    assert done.returncode == 0, f"fedplug run failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohorts") / "cohorts"
    run(out, *ARGS)
    return out


def test_cohorts_give_the_bits_of_one_supernode_per_client(cohort_run: Path, tmp_path: Path) -> None:
    single = tmp_path / "one-per-client"
    run(single, *ARGS[:-1], ARGS[-1] + " cohorts=false fold-evaluation=false")
    assert_same_run(cohort_run, single)
    config = json.loads((cohort_run / "config.json").read_text())
    assert config["cohorts"] is True and config["num-supernodes"] == 100


def test_a_failing_client_inside_a_cohort_is_that_clients_failure(cohort_run: Path) -> None:
    rounds = read_rounds(cohort_run)[1:]
    assert [len(r["train-partitions"]) for r in rounds] == [10, 10, 10]
    failed = 0
    for record in rounds:
        broken = [p for p in record["train-partitions"] if p < 30]
        assert record["train-failures"] == [{"partition": p, "reason": BROKEN} for p in broken]
        assert record["train-nodes"] == 10 - len(broken) and record["train-backends"] == {"numpy": 10 - len(broken)}
        assert record["evaluate-nodes"] == 5 and record["evaluate-failed"] == 0  # failing_train evaluates fine
        failed += len(broken)
    assert 0 < failed < 30, "the draws should mix failing and good clients"


def test_a_killed_run_on_the_cohort_path_resumes_bit_identical(cohort_run: Path) -> None:
    assert_killed_run_resumes_bit_identical("numpy", cohort_run, ARGS, None, env=PLUGINS)
