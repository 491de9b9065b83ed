"""The strategy conformance suite, run on Flower's twelve built-in strategies, and shown to catch mistakes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

import fedplug
from fedplug.builtin_strategies import BUILTINS
from fedplug.plugins import RegisteredStrategy, get_registry
from fedplug.testing import StrategyConformance

pytestmark = pytest.mark.fast

OPTIONS = {"bulyan": {"strategy.num-malicious-nodes": 1}, "multikrum": {"strategy.num-nodes-to-select": 3}}


@pytest.fixture(params=[s.name for s in BUILTINS])
def suite(request: pytest.FixtureRequest) -> StrategyConformance:
    cls = type(f"Test_{request.param}", (StrategyConformance,), {"strategy_name": request.param})
    cls.run_config = OPTIONS.get(request.param, {})
    cls.nodes = 7 if request.param == "bulyan" else 5  # Bulyan with one malicious node needs 4 * 1 + 3
    return cls()


def test_every_builtin_passes_the_suite(suite: StrategyConformance, tmp_path: Path) -> None:
    suite.check_all(tmp_path)  # every check of the suite, the node step's included


class Forgetful(fedplug.Strategy):
    """FedAdam that declares no state and claims DP: two mistakes the suite must catch."""

    name = "forgetful"
    description = "FedAdam with its state undeclared"
    implementation = "flwr.serverapp.strategy:FedAdam"
    state = ()
    composes = frozenset({"dp"})


@pytest.fixture
def forgetful(monkeypatch: pytest.MonkeyPatch) -> tuple[StrategyConformance, Forgetful]:
    registry = get_registry()
    monkeypatch.setitem(registry.strategies, "forgetful", RegisteredStrategy(Forgetful(), "in-test", "in-test", "0"))
    suite = type("TestForgetful", (StrategyConformance,), {"strategy_name": "forgetful"})()
    return suite, Forgetful()


def test_the_suite_catches_undeclared_state(forgetful: tuple[StrategyConformance, Forgetful]) -> None:
    suite, descriptor = forgetful
    with pytest.raises(AssertionError, match=r"not in state: \['current_arrays', 'm_t', 'v_t'\]"):
        suite.test_declared_state_is_what_changes_across_rounds(descriptor)


def test_the_suite_catches_a_false_composition_claim(forgetful: tuple[StrategyConformance, Forgetful]) -> None:
    suite, descriptor = forgetful
    with pytest.raises(AssertionError, match="declares dp, but is not the weighted mean"):
        suite.test_declared_compositions_hold(descriptor)


class LrFromEvaluation(FedAvg):
    """FedAvg that halves the learning rate it sends after each evaluation: its training depends on evaluation."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lr_scale = 1.0

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
        self.lr_scale *= 0.5
        return super().aggregate_evaluate(server_round, replies)

    def configure_train(self, server_round: int, arrays: Any, config: ConfigRecord, grid: Any) -> Any:
        config = ConfigRecord({**dict(config), "lr": float(config["lr"]) * self.lr_scale})  # type: ignore[arg-type]
        return super().configure_train(server_round, arrays, config, grid)


class EvaluationDriven(fedplug.Strategy):
    """Declares that its evaluation may be folded into the next training: a claim the suite must refute."""

    name = "evaluation-driven"
    description = "FedAvg whose learning rate follows its evaluations"
    implementation = f"{__name__}:LrFromEvaluation"
    state = ("lr_scale",)
    composes = frozenset({"fold"})


def test_the_suite_catches_a_false_fold_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = RegisteredStrategy(EvaluationDriven(), "in-test", "in-test", "0")
    monkeypatch.setitem(get_registry().strategies, "evaluation-driven", entry)
    suite = type("TestEvaluationDriven", (StrategyConformance,), {"strategy_name": "evaluation-driven"})()
    with pytest.raises(AssertionError, match="declares fold, but its training depends on the previous round's"):
        suite.test_declared_compositions_hold(EvaluationDriven())
