"""The strategy conformance suite: what a strategy plugin must do, checked the same way for every strategy.

A strategy's tests run it with two lines::

    from fedplug.testing import StrategyConformance

    class TestMyStrategy(StrategyConformance):
        strategy_name = "mystrategy"

The suite builds the strategy as a run does (``fedplug.strategies.make_strategy`` from the run
config, ``run_config`` adding ``strategy.<param>`` values) and drives it as fedplug's round loop
does, in-process: ``configure_train``/``configure_evaluate`` see no node (fedplug draws the nodes
and builds the messages), ``aggregate_train``/``aggregate_evaluate`` receive ``NODES`` replies
built by ``reply``: each node's weights are the round's global model plus seeded noise, with
``num-examples``, ``loss`` and ``accuracy``; a strategy that ``needs`` ``"reply-arrays"`` gets
the ArrayRecords its descriptor names in ``reply_records`` too, shaped like the weights. Its
node step (``node_step``) is run on its own, as the ClientApp runs it after a backend trained. Each check's docstring
says what it guards and how to fix a failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedplug import checkpoint, flower_adapter, folding
from fedplug.backend import Config, Scalar, Weights
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.plugins import get_registry, strategy_problem
from fedplug.records import from_record, to_record
from fedplug.strategies import make_strategy, state_names
from fedplug.strategy_contract import COMPOSES, Strategy

NODES = 5
"""Replies per round by default (``StrategyConformance.nodes``)."""
WEIGHTS: Weights = {
    "layers.0.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "layers.0.bias": np.zeros(3, np.float32),
    "layers.1.weight": np.linspace(0.5, -0.5, 6, dtype=np.float32).reshape(2, 3),
    "layers.1.bias": np.full(2, 0.1, np.float32),
}
"""A small global model; the strategy must keep its names, shapes and dtypes."""


class NoNodes:
    """The Grid as fedplug shows it to ``configure_*`` in the suite: no node, so no message is built."""

    def get_node_ids(self) -> list[int]:
        return []


class SomeNodes:
    """The Grid as fedplug shows it to ``configure_*`` for the fold check: nodes 1 and 2."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


class Reply:
    """A node's reply as ``aggregate_*`` reads it."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


def same(a: Any, b: Any) -> bool:
    """Bit-identical: the same structure, types, dtypes and values."""
    if isinstance(a, ArrayRecord) and isinstance(b, ArrayRecord):
        return same(from_record(a), from_record(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray | np.generic) or isinstance(b, np.ndarray | np.generic):
        return type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
    return type(a) is type(b) and bool(a == b)


class StrategyConformance:
    """Subclass with ``strategy_name = "..."``; pytest runs every check."""

    strategy_name: ClassVar[str] = ""
    run_config: ClassVar[dict[str, Scalar]] = {}
    """``strategy.<param>`` values (and other run-config keys) the checks run with."""
    sent_records: ClassVar[tuple[str, ...] | None] = None
    """Extra ArrayRecords (shaped like the weights) the server's train message carries, for the node step's
    check; None: those the descriptor's ``reply_records`` names (SCAFFOLD sends c and receives delta c_i)."""
    nodes: ClassVar[int] = NODES
    """Replies per round: a strategy that needs more (Bulyan with one malicious node: 7) says so."""
    atol: ClassVar[float] = 1e-6
    """Tolerance of the composition checks (sums in another order differ in the last bits)."""

    # -- building and driving --------------------------------------------------------

    @pytest.fixture
    def descriptor(self) -> Strategy:
        entry = get_registry().strategies.get(self.strategy_name)
        if entry is None:
            broken = [b.reason for b in get_registry().broken]
            pytest.fail(
                f"strategy '{self.strategy_name}' is not registered: install its distribution (pip install -e .) "
                f"and register it in the fedplug_register_strategies hook; broken plugins: {broken or 'none'}"
            )
        return entry.strategy

    def build(self, **overrides: Scalar) -> Any:
        """A fresh strategy, as a run with this suite's ``run_config`` builds it."""
        config = resolve(NumpyBackend(), {"strategy": self.strategy_name, **self.run_config, **overrides})
        return make_strategy(config)

    def reply(self, node: int, server_round: int, weights: Weights, train: bool) -> Reply:
        """Node ``node``'s reply in ``server_round``: seeded from the node and the round only."""
        rng = np.random.default_rng([server_round, node, int(train)])
        metrics = MetricRecord(
            {"num-examples": 10 + node, "loss": float(rng.uniform(0.5, 2.0)), "accuracy": float(rng.uniform(0, 1))}
        )
        content = RecordDict({"metrics": metrics})
        if train:
            noisy = {k: np.asarray(v + rng.normal(0, 0.1, v.shape), v.dtype) for k, v in weights.items()}
            content["arrays"] = to_record(noisy)
            for name in get_registry().strategies[self.strategy_name].strategy.reply_records:
                content[name] = to_record({k: rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in weights.items()})
        return Reply(content)

    def play(
        self, strategy: Any, server_round: int, arrays: ArrayRecord, nodes: list[int] | None = None
    ) -> ArrayRecord:
        """One round as fedplug's loop drives a strategy (replies of ``nodes``, all by default)."""
        nodes = list(range(self.nodes)) if nodes is None else nodes
        config = ConfigRecord({"lr": 0.05})
        assert list(strategy.configure_train(server_round, arrays, config, NoNodes())) == []
        weights = from_record(arrays)
        replies = [self.reply(node, server_round, weights, train=True) for node in nodes]
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        arrays = aggregated if aggregated is not None else arrays
        assert list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), NoNodes())) == []
        weights = from_record(arrays)
        strategy.aggregate_evaluate(server_round, [self.reply(node, server_round, weights, False) for node in nodes])
        return arrays

    def check_all(self, tmp_path: Path) -> None:
        """Every check of the suite, in the order written, for a suite built in a loop (not collected by pytest)."""
        arguments = {"descriptor": get_registry().strategies[self.strategy_name].strategy, "tmp_path": tmp_path}
        for name, check in vars(StrategyConformance).items():
            if name.startswith("test_"):
                wanted = check.__code__.co_varnames[1 : check.__code__.co_argcount]
                check(self, **{argument: arguments[argument] for argument in wanted})

    # -- the checks ------------------------------------------------------------------

    def test_registered_and_well_formed(self, descriptor: Strategy) -> None:
        """Registered through the ``fedplug`` entry point, with a descriptor fedplug accepts.

        Fix: register an instance in ``fedplug_register_strategies``; declare ``state`` and ``composes``.
        """
        assert strategy_problem(descriptor) is None, strategy_problem(descriptor)
        assert set(descriptor.composes) <= set(COMPOSES)

    def test_builds_with_its_defaults_and_refuses_out_of_range_parameters(self, descriptor: Strategy) -> None:
        """The defaults build a strategy; a value outside a parameter's declared range is refused before a run.

        Fix: make the implementation's constructor take each declared parameter in snake_case.
        """
        from fedplug.errors import ConfigError
        from fedplug.strategies import check_strategy

        self.build()
        for param in descriptor.parameters:
            if param.low is None or isinstance(param.default, bool):
                continue
            below = param.low if param.low_open else param.low - 1
            config = resolve(NumpyBackend(), {"strategy": self.strategy_name, f"strategy.{param.name}": below})
            with pytest.raises(ConfigError, match=f"strategy.{param.name}"):
                check_strategy(config)

    def test_aggregates_replies_into_a_finite_model(self) -> None:
        """Three rounds of replies give a finite global model with the weights' names, shapes and dtypes.

        Fix: return ``(ArrayRecord, MetricRecord)`` from ``aggregate_train`` built from the good replies.
        """
        strategy, arrays = self.build(), to_record(WEIGHTS)
        for server_round in (1, 2, 3):
            arrays = self.play(strategy, server_round, arrays)
        weights = from_record(arrays)
        assert list(weights) == list(WEIGHTS), "the global model must keep the weights' names and order"
        for name, array in weights.items():
            assert array.shape == WEIGHTS[name].shape, f"{name}: shape {array.shape}, expected {WEIGHTS[name].shape}"
            assert np.all(np.isfinite(array)), f"{name} is not finite after three rounds"
        assert not all(np.array_equal(weights[k], WEIGHTS[k]) for k in WEIGHTS), "three rounds changed nothing"

    def test_deterministic_for_a_seed(self) -> None:
        """Two strategies built from one config, given the same replies, give bit-identical models.

        Fix: draw any randomness from a generator seeded by the run config and the round, never global state.
        """
        first, second = self.build(), self.build()
        a = b = to_record(WEIGHTS)
        for server_round in (1, 2):
            a, b = self.play(first, server_round, a), self.play(second, server_round, b)
            assert same(from_record(a), from_record(b)), f"round {server_round} differs between two identical runs"

    def test_declared_state_is_what_changes_across_rounds(self, descriptor: Strategy) -> None:
        """``state`` names every attribute that changes from round to round (nothing is read with ``vars()``).

        Fix: add each attribute the failure names to the descriptor's ``state``.
        """
        played, fresh = self.build(), self.build()
        arrays = to_record(WEIGHTS)
        for server_round in (1, 2):
            arrays = self.play(played, server_round, arrays)
        changed = {attr for attr in vars(played) if not same(getattr(played, attr), getattr(fresh, attr, None))}
        undeclared = sorted(changed - set(descriptor.state or ()))
        assert not undeclared, f"attributes change across rounds but are not in state: {undeclared}"
        assert state_names(played) == descriptor.state

    def test_killed_run_resumes_bit_identical_from_a_checkpoint(self, tmp_path: Path) -> None:
        """Its state, saved in a checkpoint after round 2 and restored into a fresh strategy, continues exactly.

        Fix: keep state in numpy arrays, numbers, dicts or lists of them, or ArrayRecords (nothing is pickled).
        """
        played = self.build()
        arrays = to_record(WEIGHTS)
        for server_round in (1, 2):
            arrays = self.play(played, server_round, arrays)
        checkpoint.save(tmp_path, 2, from_record(arrays), played, [{"round": 2}])
        saved = checkpoint.latest(tmp_path)
        assert saved is not None
        resumed = self.build()
        checkpoint.restore_strategy(resumed, saved.strategy["layout"], saved.strategy["arrays"])
        continued, again = self.play(played, 3, arrays), self.play(resumed, 3, to_record(saved.weights))
        assert same(from_record(again), from_record(continued)), "round 3 after a resume differs from round 3"

    def test_survives_failed_and_screened_replies(self) -> None:
        """Rounds where some nodes failed or were screened out (fewer replies, other nodes) still aggregate.

        Fix: aggregate whatever replies arrive; never index replies by a fixed node count.
        """
        strategy, arrays = self.build(), to_record(WEIGHTS)
        everyone = list(range(self.nodes + 2))  # two more nodes than a round needs: two failed in each round
        for server_round, failed in ((1, {1, 3}), (2, {0, 6})):
            arrays = self.play(strategy, server_round, arrays, [node for node in everyone if node not in failed])
        assert all(np.all(np.isfinite(v)) for v in from_record(arrays).values())

    def test_declared_compositions_hold(self, descriptor: Strategy) -> None:
        """``"secagg"``: the model depends on the sum of the replies only; ``"dp"``: it is their weighted mean.

        Two nodes' updates are moved by ``+d`` and ``-d`` (their weighted sum unchanged): a strategy that
        composes with secure aggregation must give the same model. A strategy that composes with DP must
        give the examples-weighted mean of the replies (Flower's DP wrappers calibrate noise for it). A strategy
        that composes with folding (``"fold"``) configures a round's training the same whether or not the previous
        round's ``aggregate_evaluate`` ran before it, and evaluates the model it trains from next.
        Fix: declare only what the aggregation honours.
        """
        if "secagg" in descriptor.composes:
            plain, shifted = self.build(), self.build()
            weights = from_record(to_record(WEIGHTS))
            replies = [self.reply(node, 1, weights, True) for node in range(self.nodes)]
            moved = [self.reply(node, 1, weights, True) for node in range(self.nodes)]
            n0 = float(moved[0].content["metrics"]["num-examples"])  # type: ignore[arg-type]
            n1 = float(moved[1].content["metrics"]["num-examples"])  # type: ignore[arg-type]
            rng = np.random.default_rng(7)
            a, b = (from_record(cast(ArrayRecord, moved[i].content["arrays"])) for i in (0, 1))
            for key in a:
                d = rng.normal(0, 0.5, a[key].shape)
                a[key] = (a[key] + d / n0).astype(a[key].dtype)
                b[key] = (b[key] - d / n1).astype(b[key].dtype)
            moved[0].content["arrays"], moved[1].content["arrays"] = to_record(a), to_record(b)
            for strategy in (plain, shifted):
                strategy.configure_train(1, to_record(WEIGHTS), ConfigRecord({"lr": 0.05}), NoNodes())
            x, _ = plain.aggregate_train(1, replies)
            y, _ = shifted.aggregate_train(1, moved)
            for key, value in from_record(x).items():
                gap = float(np.max(np.abs(value - from_record(y)[key])))
                assert gap <= self.atol * 100, f"declares secagg, but its model depends on single replies ({key})"
        if "dp" in descriptor.composes:
            strategy = self.build()
            weights = from_record(to_record(WEIGHTS))
            replies = [self.reply(node, 1, weights, True) for node in range(self.nodes)]
            strategy.configure_train(1, to_record(WEIGHTS), ConfigRecord({"lr": 0.05}), NoNodes())
            aggregated, _ = strategy.aggregate_train(1, replies)
            counts = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])  # type: ignore[arg-type]
            for key, value in from_record(aggregated).items():
                stacked = np.stack([from_record(r.content.array_records["arrays"])[key] for r in replies])
                mean = np.tensordot(counts / counts.sum(), stacked.astype(np.float64), axes=1)
                assert np.allclose(value, mean, atol=self.atol), f"declares dp, but is not the weighted mean ({key})"
        if "fold" in descriptor.composes:
            self._check_fold()

    def _check_fold(self) -> None:
        """``"fold"``: round 2's training is configured as it would be without round 1's ``aggregate_evaluate`` run
        before it, and round 1's evaluation sends the model round 2 trains from (``fedplug.folding``)."""
        evaluated, fresh = self.build(), self.build()
        weights = from_record(to_record(WEIGHTS))
        for strategy in (evaluated, fresh):
            strategy.configure_train(1, to_record(WEIGHTS), ConfigRecord({"lr": 0.05}), NoNodes())
            arrays = strategy.aggregate_train(1, [self.reply(node, 1, weights, True) for node in range(self.nodes)])[0]
        arrays = arrays if arrays is not None else to_record(WEIGHTS)
        model = from_record(arrays)
        with flower_adapter.server_app_identity(run_id=1):
            evaluation = list(evaluated.configure_evaluate(1, arrays, ConfigRecord(), SomeNodes()))
            evaluated.aggregate_evaluate(1, [self.reply(node, 1, model, False) for node in range(self.nodes)])
            after = list(evaluated.configure_train(2, arrays, ConfigRecord({"lr": 0.05}), SomeNodes()))
            alone = list(fresh.configure_train(2, arrays, ConfigRecord({"lr": 0.05}), SomeNodes()))
        assert len(after) == len(alone) == 2, "configure_train must address every node the Grid shows it"
        for message, other in zip(after, alone):
            assert same(dict(message.content.items()), dict(other.content.items())), (
                "declares fold, but its training depends on the previous round's aggregate_evaluate"
            )
        for train, evaluate in zip(after, evaluation):
            assert folding.merged(train.content, evaluate.content) is not None, (
                "declares fold, but evaluates another model than the next round trains from"
            )

    def test_node_step_fills_what_the_descriptor_declares(self, descriptor: Strategy) -> None:
        """A strategy that needs node capabilities: its node step, run twice with the state it keeps, fills each
        declared reply record with finite arrays shaped like the weights, and is deterministic.

        Fix: set ``step.reply[name]`` for each name in ``reply_records`` and keep arrays only in ``step.state``.
        """
        from fedplug.capabilities import NodeStep, node_function

        if not descriptor.needs:
            assert not descriptor.node_step and not descriptor.reply_records
            return
        function = node_function(descriptor)
        sent_names = descriptor.reply_records if self.sent_records is None else self.sent_records
        config: dict[str, Scalar] = {"lr": 0.05, "batch-size": 4, "local-epochs": 1, "server-round": 1}

        def train(weights: Weights, step_config: Config) -> Weights:
            """The node's trainer as the ClientApp offers it (NodeStep.train): here a deterministic step of lr."""
            lr = float(step_config["lr"])
            return {k: (v - lr * np.sign(v)).astype(v.dtype) for k, v in weights.items()}

        def two_rounds() -> list[NodeStep]:
            steps: list[NodeStep] = []
            state: Weights = {}
            for server_round in (1, 2):
                rng = np.random.default_rng(server_round)
                after = {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) for k, v in WEIGHTS.items()}
                sent = {name: {k: np.full_like(v, 0.01) for k, v in WEIGHTS.items()} for name in sent_names}
                step_config = {**config, "server-round": server_round}
                step = NodeStep(dict(WEIGHTS), after, sent, state, step_config, 10, train=train)
                function(step)
                state = dict(step.state)
                steps.append(step)
            return steps

        first, again = two_rounds(), two_rounds()
        for step in first:
            assert sorted(step.reply) == sorted(descriptor.reply_records), "the reply records differ from reply_records"
            for name, arrays in [("after", step.after), *step.reply.items()]:
                assert list(arrays) == list(WEIGHTS), f"{name}: the weights' names, in order"
                assert all(np.all(np.isfinite(a)) and a.shape == WEIGHTS[k].shape for k, a in arrays.items()), name
        for a, b in zip(first, again):
            assert same(a.after, b.after) and same(a.reply, b.reply) and same(a.state, b.state), "not deterministic"
