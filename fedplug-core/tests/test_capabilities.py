"""Node capabilities (fedplug.capabilities): extra reply records and node state, served once for every backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from fedplug import checkpoint
from fedplug.capabilities import STATE_RECORD, Probe, extend_train_reply, reply_problem, take_state
from fedplug.errors import ConfigError
from fedplug.plugins import RegisteredStrategy, Registry, collect_strategies, get_registry, new_plugin_manager
from fedplug.records import from_record, to_record
from fedplug.strategies import make_strategy

pytestmark = pytest.mark.fast

BEFORE = {"w": np.zeros(3, np.float32), "b": np.ones(1, np.float32)}
AFTER = {"w": np.full(3, 0.5, np.float32), "b": np.full(1, 0.25, np.float32)}
CONFIG = {"strategy": Probe.name, "lr": 0.1, "batch-size": 4, "local-epochs": 1}


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(get_registry().strategies, Probe.name, RegisteredStrategy(Probe(), "t", "t", "0"))


def reply() -> RecordDict:
    return RecordDict({"arrays": to_record(AFTER)})


def test_the_node_step_adds_the_declared_records_and_keeps_the_state_on_the_node(probe: None) -> None:
    context_state = RecordDict()
    for server_round in (1, 2):
        content = reply()
        extend_train_reply(content, RecordDict({"arrays": to_record(BEFORE)}), context_state, CONFIG, 10)
        assert list(content.array_records) == ["arrays", "update", STATE_RECORD]
        update = from_record(content.array_records["update"])
        assert all(np.array_equal(update[k], AFTER[k] - BEFORE[k]) for k in BEFORE)
        assert int(from_record(content.array_records[STATE_RECORD])["steps"]) == server_round
        assert int(from_record(context_state.array_records[STATE_RECORD])["steps"]) == server_round


def test_a_state_sent_by_a_resumed_run_wins_over_the_nodes_empty_context(probe: None) -> None:
    content, saved = reply(), {"steps": np.asarray(7)}
    message = RecordDict({"arrays": to_record(BEFORE), STATE_RECORD: to_record(saved)})
    extend_train_reply(content, message, RecordDict(), CONFIG, 10)
    assert int(from_record(content.array_records[STATE_RECORD])["steps"]) == 8


def test_a_strategy_without_needs_leaves_the_reply_alone() -> None:
    content = reply()
    extend_train_reply(
        content, RecordDict({"arrays": to_record(BEFORE)}), RecordDict(), {**CONFIG, "strategy": "fedavg"}, 10
    )
    assert list(content.array_records) == ["arrays"]


def test_replies_are_screened_against_the_declared_records_and_the_state_is_taken_out() -> None:
    good = RecordDict({"arrays": to_record(AFTER), "update": to_record(AFTER), STATE_RECORD: to_record(BEFORE)})
    good["metrics"] = MetricRecord({"num-examples": 3})
    assert reply_problem(good, Probe()) is None
    assert "reply must carry the ArrayRecords ['arrays', 'update', 'fedplug.node-state'], got ['arrays']" in str(
        reply_problem(reply(), Probe())
    )
    bad = RecordDict({"arrays": to_record(AFTER), "update": to_record({"w": np.array([np.nan])})})
    bad[STATE_RECORD] = to_record(BEFORE)
    assert reply_problem(bad, Probe()) == "non-finite values in the reply's 'update'"
    state = take_state(good)
    assert state is not None and np.array_equal(state["b"], BEFORE["b"])
    assert list(good.array_records) == ["arrays", "update"]


def test_node_states_are_saved_in_the_checkpoint(tmp_path: Path) -> None:
    strategy = make_strategy({**_fedavg_config()})
    states = {0: {"c": np.arange(3, dtype=np.float32)}, 12: {"c": np.ones(3, np.float32), "n": np.asarray(2)}}
    checkpoint.save(tmp_path, 1, BEFORE, strategy, [], node_states=states)
    saved = checkpoint.latest(tmp_path)
    assert saved is not None and sorted(saved.node_states) == [0, 12]
    assert all(np.array_equal(saved.node_states[p][k], states[p][k]) for p in states for k in states[p])


def _fedavg_config() -> dict[str, object]:
    from fedplug.config import resolve
    from fedplug.numpy_backend import NumpyBackend

    return resolve(NumpyBackend(), {"strategy": "fedavg"})


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"node_step": ""}, "name its node-side function in node_step = 'module:function'"),
        ({"reply_records": ()}, "name the extra ArrayRecords of a train reply in reply_records"),
        ({"needs": frozenset({"node-state"})}, "names reply_records but does not declare"),
    ],
)
def test_inconsistent_capability_declarations_are_refused(changes: dict[str, object], reason: str) -> None:
    import fedplug

    class Plugin:
        @fedplug.hookimpl
        def fedplug_register_strategies(self, register):
            register(type("Bad", (Probe,), {"name": "bad", **changes})())

    manager, registry = new_plugin_manager(), Registry()
    manager.register(Plugin(), name="in-test")
    collect_strategies(manager, registry, {"in-test": ("in-test", "0")})
    assert len(registry.broken) == 1 and reason in registry.broken[0].reason


def test_a_node_without_the_strategys_plugin_trains_plainly_or_says_what_to_install() -> None:
    config = {**CONFIG, "strategy": "not_installed_here"}
    content = reply()
    extend_train_reply(content, RecordDict({"arrays": to_record(BEFORE)}), RecordDict(), config, 10)
    assert list(content.array_records) == ["arrays"]
    message = RecordDict({"arrays": to_record(BEFORE), "control": to_record(BEFORE)})
    with pytest.raises(ConfigError, match="its plugin is not installed here: install it on every node"):
        extend_train_reply(reply(), message, RecordDict(), config, 10)
