"""The server's round loop pieces without a simulation: sampling, reply checks, checkpoints, results files."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedplug import checkpoint
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.results import default_out, failure_summary, strict_json
from fedplug.rounds import draw
from fedplug.strategies import make_strategy
from fedplug.validation import check_metrics, check_weights, clip_update, update_norm

pytestmark = pytest.mark.fast

BACKEND = NumpyBackend()
REFERENCE = {"layers.0.weight": np.ones((3, 4), np.float32), "layers.0.bias": np.zeros(3, np.float32)}


def test_sampling_depends_only_on_seed_round_and_partitions() -> None:
    partitions = list(range(50))
    first = draw(partitions, 0.3, 2, seed=7, server_round=3, stream=0)
    assert first == draw(partitions, 0.3, 2, seed=7, server_round=3, stream=0)
    assert len(first) == 15 and first == sorted(set(first))  # Flower's int(n * fraction)
    assert first != draw(partitions, 0.3, 2, seed=8, server_round=3, stream=0)
    assert first != draw(partitions, 0.3, 2, seed=7, server_round=4, stream=0)
    assert first != draw(partitions, 0.3, 2, seed=7, server_round=3, stream=1)  # evaluate draws its own
    assert len(draw(list(range(4)), 0.1, 2, seed=1, server_round=1, stream=0)) == 2  # the strategy's minimum
    assert draw(partitions, 0.0, 2, seed=1, server_round=1, stream=0) == []


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ({"layers.0.weight": np.ones((3, 4), np.float32)}, "wrong weight names"),
        ({"layers.0.bias": np.zeros(3, np.float32), "layers.0.weight": np.ones((3, 4), np.float32)}, "wrong order"),
        ({"layers.0.weight": np.ones((4, 4), np.float32), "layers.0.bias": np.zeros(3, np.float32)}, "wrong shape"),
        ({"layers.0.weight": np.ones((3, 4)), "layers.0.bias": np.zeros(3, np.float32)}, "wrong dtype"),
        (
            {"layers.0.weight": np.full((3, 4), np.inf, np.float32), "layers.0.bias": np.zeros(3, np.float32)},
            "non-finite",
        ),
    ],
)
def test_bad_weights_are_refused_with_a_reason(weights, reason) -> None:
    assert reason in (check_weights(weights, REFERENCE) or "")


def test_good_weights_pass() -> None:
    assert check_weights({k: v + 1 for k, v in REFERENCE.items()}, REFERENCE) is None


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"loss": 1.0}, "positive integer"),
        ({"num-examples": 0, "loss": 1.0}, "positive integer"),
        ({"num-examples": 2.5, "loss": 1.0}, "positive integer"),
        ({"num-examples": 10**9, "loss": 1.0}, "claims 1000000000 examples but holds 100"),
        ({"num-examples": 50, "loss": math.nan}, "non-finite metric 'loss'"),
        ({"num-examples": 50, "loss": [1.0, math.inf]}, "non-finite metric 'loss'"),
    ],
)
def test_bad_metrics_are_refused_with_a_reason(metrics, reason) -> None:
    assert reason in (check_metrics(metrics, max_examples=100) or "")
    assert check_metrics({"num-examples": 100, "loss": 0.3, "accuracy": 1}, max_examples=100) is None


def test_clip_update_bounds_the_norm_and_keeps_small_updates() -> None:
    big = {k: v + 10 for k, v in REFERENCE.items()}
    clipped = clip_update(big, REFERENCE, 1.0)
    assert update_norm(clipped, REFERENCE) == pytest.approx(1.0, rel=1e-5)
    assert all(clipped[k].dtype == REFERENCE[k].dtype for k in REFERENCE)
    small = {k: v + 1e-3 for k, v in REFERENCE.items()}
    assert clip_update(small, REFERENCE, 1.0) is small


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_strategy_state_survives_a_checkpoint(name: str, tmp_path: Path) -> None:
    config = resolve(
        BACKEND, {"strategy": name, "strategy.server-momentum": 0.9} if name == "fedavgm" else {"strategy": name}
    )
    strategy = make_strategy(config)
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in REFERENCE.items()}
    if name == "fedavgm":
        strategy.momentum_vector = list(state.values())
        strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    else:
        strategy.m_t, strategy.v_t, strategy.current_arrays = dict(state), {k: v * 2 for k, v in state.items()}, {}
    checkpoint.save(tmp_path, 3, REFERENCE, strategy, [{"round": 3}], failed_in_a_row=1)
    checkpoint.save(tmp_path, 4, REFERENCE, strategy, [{"round": 4}], failed_in_a_row=0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-0004"]  # only the newest is kept
    saved = checkpoint.latest(tmp_path)
    assert saved is not None and saved.round == 4 and saved.rounds == [{"round": 4}]
    fresh = make_strategy(config)
    checkpoint.restore_strategy(fresh, saved.strategy["layout"], saved.strategy["arrays"])
    if name == "fedavgm":
        for got, want in zip(fresh.momentum_vector, state.values()):
            np.testing.assert_array_equal(got, want)
        assert list(fresh.current_arrays) == list(state)
    else:
        for key, value in state.items():
            np.testing.assert_array_equal(fresh.m_t[key], value)
            np.testing.assert_array_equal(fresh.v_t[key], value * 2)
        assert fresh.current_arrays == {}


def test_a_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    strategy = make_strategy(resolve(BACKEND, {}))
    checkpoint.save(tmp_path, 2, REFERENCE, strategy, [])
    (tmp_path / "checkpoints" / ".round-0003.tmp-1").mkdir()  # a kill while writing round 3
    broken = tmp_path / "checkpoints" / "round-0004"
    broken.mkdir()
    (broken / "state.json").write_text("{")
    saved = checkpoint.latest(tmp_path)
    assert saved is not None and saved.round == 2


def test_results_json_is_strict() -> None:
    text = strict_json({"rounds": [{"loss": math.nan, "accuracy": math.inf, "name": "é 🌼"}]})
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}")) == {
        "rounds": [{"loss": None, "accuracy": None, "name": "é 🌼"}]
    }


def test_default_results_folders_never_collide(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: default_out("numpy", tmp_path), range(16)))
    assert len(set(folders)) == 16 and all(folder.is_dir() for folder in folders)


def test_failure_summary_counts_nodes_per_reason() -> None:
    rounds = [
        {
            "round": 1,
            "train-failures": [{"partition": 1, "reason": "non-finite weights"}, {"partition": 2, "reason": "x"}],
        },
        {"round": 2, "train-failures": [{"partition": 1, "reason": "non-finite weights"}], "evaluate-failures": []},
        {"round": 3, "train-failures": [{"partition": 3, "reason": "non-finite weights"}]},
    ]
    assert failure_summary(rounds) == ["2 nodes: non-finite weights", "1 node: x"]


def test_a_round_record_writes_the_keys_values_and_order_of_metrics_json() -> None:
    from fedplug.rounds import Exchange, NodeInfo, RoundRecord

    nodes = [NodeInfo(11, 0, "torch", 100, 20), NodeInfo(12, 3, "jax", 100, 20), NodeInfo(13, 5, "torch", 100, 20)]
    train = Exchange(nodes[:2], replies=["reply of 0"], failures=[{"partition": 3, "reason": "no reply"}])  # type: ignore[list-item]
    train.node_seconds, train.metrics = [0.5, 0.25], {"loss": 0.5, "accuracy": 0.75}
    evaluate = Exchange([nodes[0], nodes[2]], replies=["a", "b"], node_seconds=[0.125, 0.0625])  # type: ignore[list-item]
    evaluate.metrics = {"loss": 0.25}
    record = RoundRecord(4, train, evaluate, unusable=[{"node": 99, "reason": "broken"}], seconds=1.5)
    record.centralized = {"loss": 0.125, "accuracy": 0.875}
    written = record.to_json()
    assert list(written.items()) == [
        ("round", 4),
        ("train-partitions", [0, 3]),
        ("train-backends", {"torch": 1}),
        ("partition-backends", {"0": "torch", "3": "jax", "5": "torch"}),
        ("train-nodes", 1),
        ("train-failed", 1),
        ("train-failures", [{"partition": 3, "reason": "no reply"}]),
        ("train-slowest-seconds", 0.5),
        ("compute-seconds", 0.9375),
        ("train-loss", 0.5),
        ("train-accuracy", 0.75),
        ("evaluate-partitions", [0, 5]),
        ("evaluate-backends", {"torch": 2}),
        ("evaluate-nodes", 2),
        ("evaluate-failed", 0),
        ("evaluate-failures", []),
        ("evaluate-slowest-seconds", 0.125),
        ("evaluate-loss", 0.25),
        ("unusable-nodes", [{"node": 99, "reason": "broken"}]),
        ("centralized-loss", 0.125),
        ("centralized-accuracy", 0.875),
        ("seconds", 1.5),
    ]
    skipped = RoundRecord(5, Exchange([]), skipped="no node available", seconds=0.25).to_json()
    assert skipped == {"round": 5, "train-partitions": [], "skipped": "no node available", "seconds": 0.25}
