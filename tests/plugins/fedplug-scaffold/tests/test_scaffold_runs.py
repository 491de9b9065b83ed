"""SCAFFOLD, installed from tests/plugins/fedplug-scaffold: listed, run on two backends, resumed bit-identically.

The resume check kills the run after round 1: rounds 2 and 3 train only if every node gets back the client
control variate it kept (the core's node-state capability, saved in the checkpoint), and the server its c.
"""

from __future__ import annotations

import json

from fedplug.testing.runs import assert_killed_run_resumes_bit_identical, fedplug, read_rounds

ARGS = ("--strategy", "scaffold", "--rounds", "3", "--nodes", "2", "--run-config", "strategy.server-lr=0.8")


def test_scaffold_is_listed_with_its_distribution_and_needs() -> None:
    done = fedplug("list", "--strategies", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = [row for row in json.loads(done.stdout) if row["name"] == "scaffold"]
    assert (row["distribution"], row["version"]) == ("fedplug-scaffold", "0.1.0")
    assert row["needs"] == ["node-state", "reply-arrays"] and "server-lr" in row["parameters"]


def learned(out) -> tuple[float, float]:
    rounds = read_rounds(out)
    assert all(r.get("train-failed", 0) == 0 for r in rounds), [r.get("train-failures") for r in rounds]
    return rounds[0]["centralized-accuracy"], rounds[-1]["centralized-accuracy"]


def test_scaffold_learns_on_numpy_and_a_killed_run_resumes_bit_identical(run_fedplug) -> None:
    _, out = run_fedplug("numpy", *ARGS)
    first, last = learned(out)
    assert last > first + 0.5, (first, last)
    assert_killed_run_resumes_bit_identical("numpy", out, ARGS, "model.npz")


def test_scaffold_learns_on_torch(run_fedplug) -> None:
    _, out = run_fedplug("torch", "--strategy", "scaffold", "--rounds", "2", "--nodes", "2")
    first, last = learned(out)
    assert last > first + 0.3, (first, last)
