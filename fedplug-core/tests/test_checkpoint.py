"""Checkpoints keep exactly the state each strategy declares, by name, and a resumed strategy goes on bit-identical."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedplug import checkpoint
from fedplug.builtin_strategies import FLOWER_CLASSES, STATE
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.records import from_record, to_record
from fedplug.strategies import make_strategy
from fedplug.testing.strategies import NoNodes, Reply, same

pytestmark = pytest.mark.fast

BACKEND = NumpyBackend()
# a 0-d weight (a scale, a counter) makes numpy scalars in FedOpt's moments and FedAvgM's momentum
WEIGHTS = {
    "layers.0.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "layers.0.bias": np.zeros(3, np.float32),
    "scale": np.array(0.5, np.float32),
}
OPTIONS = {"fedavgm": {"strategy.server-momentum": 0.9}, "bulyan": {"strategy.num-malicious-nodes": 1}}
NODES = 7  # Bulyan with one malicious node needs 4 * 1 + 3


def strategy(name: str) -> Any:
    return make_strategy(resolve(BACKEND, {"strategy": name, **OPTIONS.get(name, {})}))


def replies(server_round: int, arrays: ArrayRecord, train: bool) -> list[Reply]:
    rng = np.random.default_rng([server_round, int(train)])
    weights = from_record(arrays)
    out = []
    for node in range(NODES):
        metrics = MetricRecord({"num-examples": 10 + node, "loss": float(rng.uniform(0.5, 2)), "accuracy": 0.5})
        content = RecordDict({"metrics": metrics})
        if train:
            content["arrays"] = to_record(
                {k: np.asarray(v + rng.normal(0, 0.1, v.shape), v.dtype) for k, v in weights.items()}
            )
        out.append(Reply(content))
    return out


def play(strategy: Any, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
    """One round as fedplug's loop drives a strategy (without the messages)."""
    assert list(strategy.configure_train(server_round, arrays, ConfigRecord(), NoNodes())) == []
    aggregated, _ = strategy.aggregate_train(server_round, replies(server_round, arrays, train=True))
    arrays = aggregated if aggregated is not None else arrays
    assert list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), NoNodes())) == []
    strategy.aggregate_evaluate(server_round, replies(server_round, arrays, train=False))
    return arrays


def test_every_strategy_declares_its_state() -> None:
    assert set(STATE) == set(FLOWER_CLASSES)


@pytest.mark.parametrize("name", sorted(FLOWER_CLASSES))
def test_declared_state_is_exactly_what_changes_across_rounds(name: str) -> None:
    played, fresh = strategy(name), strategy(name)
    arrays = to_record(WEIGHTS)
    for server_round in range(1, 4):
        arrays = play(played, server_round, arrays)
    assert set(vars(played)) == set(vars(fresh))
    changed = {attr for attr in vars(played) if not same(getattr(played, attr), getattr(fresh, attr))}
    assert changed == set(STATE[name])


@pytest.mark.parametrize("name", sorted(FLOWER_CLASSES))
def test_a_restored_strategy_continues_bit_identical(name: str, tmp_path: Path) -> None:
    played = strategy(name)
    arrays = to_record(WEIGHTS)
    for server_round in (1, 2):
        arrays = play(played, server_round, arrays)
    checkpoint.save(tmp_path, 2, from_record(arrays), played, [{"round": 2}])
    saved = checkpoint.latest(tmp_path)
    assert saved is not None
    resumed = strategy(name)
    checkpoint.restore_strategy(resumed, saved.strategy["layout"], saved.strategy["arrays"])
    for attr in STATE[name]:
        assert same(getattr(resumed, attr), getattr(played, attr)), attr
    continued, again = play(played, 3, arrays), play(resumed, 3, to_record(saved.weights))
    assert same(from_record(again), from_record(continued))


def test_numbers_in_the_state_keep_their_type(tmp_path: Path) -> None:
    played = strategy("fedavgm")
    state = [np.float32(0.25), np.ones(2, np.float64), np.int64(3)]
    played.momentum_vector, played.current_arrays = state, None
    checkpoint.save(tmp_path, 1, WEIGHTS, played, [])
    saved = checkpoint.latest(tmp_path)
    assert saved is not None
    resumed = strategy("fedavgm")
    resumed.current_arrays = to_record(WEIGHTS)
    checkpoint.restore_strategy(resumed, saved.strategy["layout"], saved.strategy["arrays"])
    assert same(resumed.momentum_vector, state) and resumed.current_arrays is None


def test_checkpoints_after_round_9999_resume(tmp_path: Path) -> None:
    played = strategy("fedadam")
    for server_round in (9999, 10000, 10001):
        checkpoint.save(tmp_path, server_round, WEIGHTS, played, [{"round": server_round}])
        saved = checkpoint.latest(tmp_path)
        assert saved is not None and saved.round == server_round and saved.rounds == [{"round": server_round}]
    (tmp_path / "checkpoints" / "round-9999").mkdir()  # a leftover older checkpoint sorts below round-10001
    saved = checkpoint.latest(tmp_path)
    assert saved is not None and saved.round == 10001


class Undeclared(FedAvg):  # type: ignore[misc]
    """A strategy fedplug does not know: its state may be anything."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[float] = []


def test_a_strategy_without_declared_state_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Undeclared declares no checkpoint state"):
        checkpoint.save(tmp_path, 1, WEIGHTS, Undeclared(), [])
    assert checkpoint.latest(tmp_path) is None
    played = strategy("fedadam")
    played.m_t = {"scale": "not an array"}
    with pytest.raises(TypeError, match=r"FedAdam.m_t\['scale'\] is a str"):
        checkpoint.save(tmp_path, 1, WEIGHTS, played, [])
    assert checkpoint.latest(tmp_path) is None


def test_state_of_another_strategy_is_refused(tmp_path: Path) -> None:
    played = strategy("fedavgm")
    play(played, 1, to_record(WEIGHTS))
    checkpoint.save(tmp_path, 1, WEIGHTS, played, [])
    saved = checkpoint.latest(tmp_path)
    assert saved is not None
    fedadam = strategy("fedadam")
    before = copy.deepcopy(vars(fedadam))
    with pytest.raises(ValueError, match="momentum_vector that FedAdam does not declare"):
        checkpoint.restore_strategy(fedadam, saved.strategy["layout"], saved.strategy["arrays"])
    assert all(same(getattr(fedadam, k), v) for k, v in before.items())


def test_a_checkpoint_of_the_earlier_layout_resumes(tmp_path: Path) -> None:
    # fedplug before declared state wrote only the array-valued attributes, without "scalars"
    moment = {k: v + 1 for k, v in WEIGHTS.items() if v.ndim}
    layout = {"m_t": {"kind": "dict", "keys": list(moment)}, "v_t": {"kind": "dict", "keys": list(moment)}}
    arrays = {f"{attr}/{i}": value for attr in ("m_t", "v_t") for i, value in enumerate(moment.values())}
    resumed = strategy("fedadam")
    checkpoint.restore_strategy(resumed, layout, arrays)
    assert same(resumed.m_t, moment) and same(resumed.v_t, moment) and resumed.current_arrays is None
