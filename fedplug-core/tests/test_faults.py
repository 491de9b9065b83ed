"""A faulty client never poisons or kills a federation: 10 nodes, 3 of them faulty, on the Simulation Engine.

The faults come from the ``faulty`` test backend (tests/plugins/fedplug-faulty). Each
scenario runs under FedAvg and under a robust strategy (FedMedian) and is compared with
the same run without faults (runs are reproducible, so the comparison is exact).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedplug.testing.runs import check_results, fedplug

SMALL = "hidden-dims='32' lr=0.1"
SCENARIOS = {
    "none": "",
    "raise-nan-huge": "faulty.faults='0:raise,4:nan,8:huge'",
    "shape-dtype-liar": "faulty.faults='1:shape,5:dtype,9:liar'",
    "slow": "faulty.faults='2:slow,3:slow,7:slow' faulty.rounds='1' faulty.delay=24.0 round-timeout=12.0",
}
EXPECTED_REASONS = {
    "raise-nan-huge": {
        0: "train raised ValueError: injected fault on partition 0",
        4: "non-finite weights",
        8: "outlier",
    },
    "shape-dtype-liar": {1: "wrong shape", 5: "wrong dtype", 9: "claims 1000000000 examples"},
    "slow": {2: "no reply within round-timeout (12 s)", 3: "no reply within round-timeout", 7: "no reply within"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Run each (strategy, scenario) once; tests read their results folders."""
    done: dict[tuple[str, str], tuple[object, Path]] = {}

    def get(strategy: str, scenario: str):
        if (strategy, scenario) not in done:
            out = tmp_path_factory.mktemp("faults") / f"{strategy}-{scenario}"
            extra = ["--client-cpus", "0.5"] if scenario == "slow" else []  # slow nodes must not hold every worker
            proc = fedplug(
                "run", "faulty", "--nodes", "10", "--rounds", "2", "--strategy", strategy, "--out", str(out),
                "--run-config", f"{SMALL} {SCENARIOS[scenario]}", *extra,
                env={"FEDPLUG_PLUGINS": "faulty"},
            )  # fmt: skip
            done[(strategy, scenario)] = (proc, out)
        return done[(strategy, scenario)]

    return get


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "none"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian"])
def test_faulty_nodes_cost_their_replies_not_the_model(runs, strategy: str, scenario: str) -> None:
    proc, out = runs(strategy, scenario)
    assert proc.returncode == 0, f"the run failed:\n{proc.stdout}\n{proc.stderr}"
    rounds = check_results(out, ".npz")
    with np.load(out / "weights.npz") as weights:
        assert all(np.isfinite(weights[key]).all() for key in weights.files), "the global model is not finite"
    _, clean = runs(strategy, "none")
    baseline = json.loads((clean / "metrics.json").read_text())["rounds"][-1]["centralized-accuracy"]
    accuracy = rounds[-1]["centralized-accuracy"]
    assert abs(accuracy - baseline) <= 0.03, f"{scenario}: accuracy {accuracy:.3f} vs {baseline:.3f} without faults"
    # every failure is counted with its reason, per round, and shown to the user
    expected = EXPECTED_REASONS[scenario]
    faulty_rounds = [1] if scenario == "slow" else [1, 2]
    for record in rounds[1:]:
        failures = {f["partition"]: f["reason"] for f in record["train-failures"]}
        if record["round"] in faulty_rounds:
            assert set(failures) == set(expected), record
            for partition, reason in expected.items():
                assert reason in failures[partition]
            assert record["train-nodes"] == 7 and record["train-failed"] == 3
            assert "nodes 7/10 · 3 failed" in proc.stdout
        else:
            assert failures == {}
    for reason in expected.values():
        assert any(line.startswith("failed: ") and reason in line for line in proc.stdout.splitlines()), proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_lying_about_examples_does_not_dominate(runs) -> None:
    _, out = runs("fedavg", "shape-dtype-liar")
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert all(math.isfinite(r["centralized-accuracy"]) for r in rounds)
    assert rounds[-1]["centralized-accuracy"] > 0.75
