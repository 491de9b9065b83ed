"""SecAgg+ (secagg=true): the server learns only the weighted sum, FedAvg's result up to a bounded quantisation error.

The protocol's tests drive ``fedplug.secagg.secure_train`` (the server's side, as the round loop calls it) over an
in-process Grid that hands each message to fedplug's real ClientApp (numpy backend, 10 nodes) and records every
reply the server receives; the end-to-end tests run it on the Simulation Engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import fedplug.api
from fedplug import flower_adapter, secagg
from fedplug.apps import client_app
from fedplug.config import resolve
from fedplug.errors import ConfigError
from fedplug.numpy_backend import NumpyBackend
from fedplug.records import from_record, to_record
from fedplug.secagg import COLLECT

NODES = 10
BACKEND = NumpyBackend()


def _config(**overrides: Any) -> dict[str, Any]:
    return resolve(BACKEND, {"num-supernodes": NODES, "hidden-dims": "16", "secagg": True, **overrides})


class RecordingGrid:
    """A Grid whose nodes are fedplug's ClientApp in this process; it keeps every reply the server receives.

    ``drop`` names (action, node) pairs whose message the node never answers: a node gone after that stage.
    """

    def __init__(self, config: dict[str, Any], drop: set[tuple[str, int]] = frozenset()) -> None:  # type: ignore[assignment]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": NODES},
                state=RecordDict(),
                run_config=config,
            )
            for node in range(1, NODES + 1)
        }
        self.drop, self.received, self.secrets = drop, [], {}  # secrets: what each node holds, for the checks
        self.sent = 0

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            if (kind.removeprefix("train."), node) in self.drop:
                continue
            self.sent += 1
            delivered = flower_adapter.message_for_client_app(
                message.content, message_type=kind, run_id=1, message_id=str(self.sent), dst_node_id=node, group_id="1"
            )
            reply = client_app(delivered, self.contexts[node])
            state = self.contexts[node].state
            if secagg.RECORD in state.config_records:
                held = state.config_records[secagg.RECORD]
                self.secrets.setdefault(node, {}).update(
                    {key: held[key] for key in ("mask-private", "share-private", "seed") if key in held}
                )
            self.received.append(reply)
            replies.append(reply)
        return replies


def _train_messages(arrays: Any, nodes: list[int]) -> list[Message]:
    return [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})}),
            dst_node_id=node,
            message_type="train",
            group_id="1",
        )
        for node in nodes
    ]


def _plain_fedavg(config: dict[str, Any], arrays: Any, nodes: list[int]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """FedAvg's weighted mean of the nodes' plain train replies (float64), and each node's update."""
    grid = RecordingGrid(config)
    reference = secagg._flatten(from_record(arrays), list(from_record(arrays)))
    total, count, updates = 0.0, 0, {}
    with flower_adapter.server_app_identity(run_id=1):
        messages = _train_messages(arrays, nodes)
    for reply in grid.send_and_receive(messages, timeout=60):
        n = int(reply.content.metric_records["metrics"]["num-examples"])
        weights = from_record(reply.content.array_records["arrays"])
        updates[reply.metadata.src_node_id] = secagg._flatten(weights, list(weights)) - reference
        total, count = total + n * secagg._flatten(weights, list(weights)), count + n
    return total / count, updates


def _secure(config: dict[str, Any], arrays: Any, nodes: list[int], drop: set[tuple[str, int]] = frozenset()):  # type: ignore[assignment]
    grid = RecordingGrid(config, drop)
    examples = {node: _examples(config, node) for node in nodes}
    with flower_adapter.server_app_identity(run_id=1):
        outcome = secagg.secure_train(grid, _train_messages(arrays, nodes), examples, config, 1, 60.0)
    return grid, outcome, examples


def _examples(config: dict[str, Any], node: int) -> int:
    from fedplug.node import node_data

    return len(node_data(config, {"partition-id": node - 1, "num-partitions": NODES}).y_train)


def _bound(config: dict[str, Any], examples: dict[int, int], survivors: list[int]) -> float:
    """Each node's stochastic rounding errs by less than one quantum ``2c/q`` per coordinate (no clipping: |u| < c),
    and the node sends ``u * n / n_max``: the mean's error is below ``k * 2c/q / sum(n / n_max)``."""
    quantum = 2 * config["secagg.clipping-range"] / config["secagg.quantization-range"]
    scale = max(examples.values())
    return len(survivors) * quantum / sum(examples[node] / scale for node in survivors)


@pytest.fixture(scope="module")
def initial() -> Any:
    config = _config()
    from fedplug.data import data_spec

    return to_record(BACKEND.get_weights(BACKEND.build_model("mlp", data_spec(config), config)))


# -- Flower's helpers through the adapter -------------------------------------------------------


@pytest.mark.fast
def test_flowers_quantisation_is_seeded_reproducible_and_leaves_numpys_stream_alone() -> None:
    vector = np.linspace(-3, 3, 1001)
    np.random.seed(5)
    expected_next = np.random.rand()
    np.random.seed(5)
    first = flower_adapter.quantize(vector, 4.0, 1000, seed=7)
    assert np.random.rand() == expected_next  # the global stream did not move
    assert np.array_equal(first, flower_adapter.quantize(vector, 4.0, 1000, seed=7))
    assert first.dtype == np.int64 and first.min() >= 0 and first.max() <= 1000
    back = flower_adapter.dequantize(first, 4.0, 1000)
    assert np.max(np.abs(back - vector)) < 8.0 / 1000  # within one quantum
    assert flower_adapter.quantize(np.array([9.0]), 4.0, 1000, seed=1)[0] == 1000  # clipped


@pytest.mark.fast
def test_flowers_shamir_sharing_needs_the_threshold() -> None:
    secret = bytes(range(32))
    shares = flower_adapter.shamir_split(secret, 3, 5)
    assert len(shares) == 5
    assert flower_adapter.shamir_combine(shares[1:4]) == secret
    assert flower_adapter.shamir_combine([shares[0], shares[2], shares[4]]) == secret
    with pytest.raises(ValueError):  # two shares rebuild nothing (the padding check fails) or a wrong secret
        assert flower_adapter.shamir_combine(shares[:2]) == secret


@pytest.mark.fast
def test_server_app_identity_lets_the_server_address_a_node() -> None:
    with flower_adapter.server_app_identity(run_id=7):
        message = Message(RecordDict(), dst_node_id=3, message_type="train.x", group_id="1")
    assert message.metadata.run_id == 7 and message.metadata.dst_node_id == 3
    with pytest.raises(RuntimeError):
        Message(RecordDict(), dst_node_id=3, message_type="train.x", group_id="1")


# -- the protocol -------------------------------------------------------------------------------


@pytest.mark.fast
def test_the_ring_of_neighbours_is_symmetric() -> None:
    graph = secagg.neighbours(list(range(10)), 5)
    assert graph[0] == [0, 1, 2, 8, 9] and all(len(nodes) == 5 for nodes in graph.values())
    assert all(a in graph[b] for a in graph for b in graph[a])
    assert secagg.neighbours([1, 2, 3], 0) == {1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2, 3]}


@pytest.mark.fast
def test_secure_train_gives_fedavgs_weighted_mean_up_to_the_quantisation_bound(initial) -> None:
    config = _config(**{"secagg.num-shares": 5})
    nodes = list(range(1, NODES + 1))
    expected, updates = _plain_fedavg(config, initial, nodes)
    _grid, outcome, examples = _secure(config, initial, nodes)
    assert outcome.failures == {} and len(outcome.survivors) == NODES
    assert max(np.max(np.abs(u)) for u in updates.values()) < config["secagg.clipping-range"]  # the bound's premise
    aggregate = outcome.aggregate.content
    got = secagg._flatten(from_record(aggregate["arrays"]), list(from_record(initial)))
    error, bound = np.max(np.abs(got - expected)), _bound(config, examples, nodes)
    assert error < bound, f"error {error:.3g}, bound {bound:.3g}"
    assert error > 0  # really quantised: it is not the plain mean sent through
    assert aggregate["metrics"]["num-examples"] == sum(examples.values())


@pytest.mark.fast
def test_two_nodes_dropping_after_sharing_keys_are_unmasked_from_shares(initial) -> None:
    config = _config()  # every node shares with all: reconstruction-threshold a majority, 6 of 10
    nodes = list(range(1, NODES + 1))
    drop = {(secagg.COLLECT, 4), (secagg.COLLECT, 9)}
    _grid, outcome, examples = _secure(config, initial, nodes, drop)
    survivors = [node for node in nodes if node not in (4, 9)]
    assert sorted(outcome.failures) == [4, 9] and "no reply" in outcome.failures[4]
    expected, _ = _plain_fedavg(config, initial, survivors)
    got = secagg._flatten(from_record(outcome.aggregate.content["arrays"]), list(from_record(initial)))
    assert np.max(np.abs(got - expected)) < _bound(config, examples, survivors)
    assert outcome.aggregate.content["metrics"]["num-examples"] == sum(examples[node] for node in survivors)


@pytest.mark.fast
def test_a_second_round_on_the_same_nodes_starts_afresh_after_dropouts(initial) -> None:
    config = _config()
    nodes = list(range(1, NODES + 1))
    grid = RecordingGrid(config, {(secagg.COLLECT, 4), (secagg.COLLECT, 9)})
    examples = {node: _examples(config, node) for node in nodes}
    with flower_adapter.server_app_identity(run_id=1):
        first = secagg.secure_train(grid, _train_messages(initial, nodes), examples, config, 1, 60.0)
        grid.drop = set()  # nodes 4 and 9 are back; their round-1 state is left over from before they dropped
        dtypes = {name: array.dtype for name, array in from_record(initial).items()}  # as the round loop keeps them
        model = to_record({k: v.astype(dtypes[k]) for k, v in from_record(first.aggregate.content["arrays"]).items()})
        second = secagg.secure_train(grid, _train_messages(model, nodes), examples, config, 2, 60.0)
    assert sorted(first.failures) == [4, 9] and second.failures == {}
    expected, _ = _plain_fedavg(config, model, nodes)
    got = secagg._flatten(from_record(second.aggregate.content["arrays"]), list(from_record(initial)))
    assert np.max(np.abs(got - expected)) < _bound(config, examples, nodes)


@pytest.mark.fast
def test_too_many_dropouts_end_the_step_without_a_result(initial) -> None:
    # 8 of 10 masked vectors, threshold 9: the server gives up before asking for shares
    config = _config(**{"secagg.reconstruction-threshold": 9})
    drop = {(secagg.COLLECT, 2), (secagg.COLLECT, 3)}
    _, outcome, _ = _secure(config, initial, list(range(1, NODES + 1)), drop)
    assert outcome.aggregate is None and sorted(outcome.failures) == list(range(1, NODES + 1))
    assert outcome.failures[1] == "secagg: 8 masked vectors, reconstruction-threshold is 9"
    # a ring of 5, threshold 4: two neighbours of node 1 drop, so its seed has too few shares left
    config = _config(**{"secagg.num-shares": 5, "secagg.reconstruction-threshold": 4})
    _, outcome, _ = _secure(config, initial, list(range(1, NODES + 1)), drop)
    assert outcome.aggregate is None
    assert "3 active nodes, fewer than the threshold" in outcome.failures[1]  # node 1 refuses to unmask
    assert any("too many nodes dropped" in reason for reason in outcome.failures.values())


class _Drawn:
    """The Grid as the strategy's ``configure_train`` sees it in the round loop: the drawn nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _dp_round(config: dict[str, Any], arrays: Any, nodes: list[int], secure: bool, drop: set[tuple[str, int]]) -> Any:
    """Round 1 as the round loop runs it under central DP: the configured strategy (Flower's wrapper over
    ``fedplug.dp.FixedDenominator``), its train messages, the nodes' replies (plain: fixedclipping_mod clips them;
    secure: one reply, the unmasked sum), the wrapper's aggregate with its seeded noise. Returns the aggregate,
    the updates the strategy got (plain: the clipped ones), and the secure round's outcome."""
    from fedplug.strategies import make_strategy

    strategy = make_strategy(config)
    grid = RecordingGrid(config, drop)
    outcome = None
    with flower_adapter.server_app_identity(run_id=1):
        messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), _Drawn(nodes)))
        if secure:
            examples = {node: _examples(config, node) for node in nodes}
            outcome = secagg.secure_train(grid, messages, examples, config, 1, 60.0)
            replies = [outcome.aggregate]
        else:  # the nodes that drop in the secure round are simply not asked here
            replies = grid.send_and_receive(
                [m for m in messages if (COLLECT, m.metadata.dst_node_id) not in drop], timeout=60
            )
        names, reference = list(from_record(arrays)), secagg._flatten(from_record(arrays), list(from_record(arrays)))
        updates = [secagg._flatten(from_record(r.content["arrays"]), names) - reference for r in replies]
        aggregated, _ = strategy.aggregate_train(1, replies)  # (FixedDenominator rescales the replies in place)
    return secagg._flatten(from_record(aggregated), names), updates, outcome


@pytest.mark.fast
def test_secagg_with_client_side_dp_gives_client_fixed_dps_aggregate_noise_included(initial) -> None:
    """Each node clips its update and masks it with weight 1; the server unmasks the sum, the DP wrapper divides it
    by the expected 10 nodes and adds its noise: plain client-fixed DP's aggregate up to the quantisation bound,
    with two nodes dropping after sharing keys (the denominator stays 10), noiseless and with the same seeded noise."""
    nodes = list(range(1, NODES + 1))
    drop = {(COLLECT, 4), (COLLECT, 9)}
    survivors = [node for node in nodes if node not in (4, 9)]
    norm = 0.3
    reference = secagg._flatten(from_record(initial), list(from_record(initial)))
    quiet = None
    for z in (0.0, 0.5):
        config = _config(dp="client-fixed", **{"dp.noise-multiplier": z, "dp.clipping-norm": norm, "dp.noise-seed": 3})
        plain, clipped, _ = _dp_round(config, initial, nodes, secure=False, drop=drop)
        norms = [np.linalg.norm(update) for update in clipped]
        assert len(norms) == len(survivors) and np.allclose(norms, norm, rtol=1e-5)  # every update was clipped
        secure, _, outcome = _dp_round(config, initial, nodes, secure=True, drop=drop)
        assert outcome is not None and sorted(outcome.failures) == [4, 9]
        # per weight, each survivor errs by under one quantum (stochastic rounding) plus what clipping to the norm
        # less the quantisation slack s takes off its clipped update c (|c| s / norm), over the expected count;
        # and the float32 models' rounding
        settings = secagg.Settings.from_config(config)
        quantum = 2 * settings.clipping_range / settings.quantization_range
        slack = settings.quantisation_slack(reference.size)
        bound = (len(survivors) * quantum + slack / norm * np.sum(np.abs(clipped), axis=0)) / NODES + 1e-7
        error = np.abs(secure - plain)
        assert np.all(error < bound), f"error {np.max(error - bound):.3g} above the bound"
        assert np.max(error) > 0
        if z == 0:
            quiet = secure
            # the sum over the expected 10 nodes, not the mean of the 8 survivors (that would be 10/8 of the update)
            assert np.linalg.norm(secure - reference) < len(survivors) * norm / NODES + np.linalg.norm(bound)
        else:  # the wrapper's noise, z * clipping norm / expected per weight, the same draw as the plain round's
            assert quiet is not None
            assert np.std(secure - quiet) == pytest.approx(z * norm / NODES, rel=0.1)


@pytest.mark.fast
def test_with_local_dp_each_node_noises_its_update_before_masking_it(initial) -> None:
    """dp=local with secagg: Flower's LocalDpMod on each node, then the masking; the server's weighted mean carries
    each node's noise (stddev z * 2 * clipping norm) with its weight n / n_max."""
    nodes = list(range(1, NODES + 1))
    _, plain, examples = _secure(_config(), initial, nodes)
    z, norm = 0.001, 100.0  # a clipping norm no update reaches: the difference is the noise alone
    config = _config(dp="local", **{"dp.noise-multiplier": z, "dp.clipping-norm": norm, "dp.noise-seed": 4})
    _, noisy, _ = _secure(config, initial, nodes)
    _, again, _ = _secure(config, initial, nodes)
    names = list(from_record(initial))
    difference = secagg._flatten(from_record(noisy.aggregate.content["arrays"]), names) - secagg._flatten(
        from_record(plain.aggregate.content["arrays"]), names
    )
    weights = np.array([examples[node] for node in nodes], dtype=float)
    expected = z * 2 * norm * np.sqrt(np.sum(weights**2)) / np.sum(weights)
    assert np.std(difference) == pytest.approx(expected, rel=0.05)
    # dp.noise-seed: the same noise again (seeded by it, the round and the node)
    repeated = secagg._flatten(from_record(again.aggregate.content["arrays"]), names)
    assert np.array_equal(repeated, secagg._flatten(from_record(noisy.aggregate.content["arrays"]), names))


@pytest.mark.fast
def test_no_reply_the_server_receives_reveals_a_nodes_update(initial) -> None:
    config = _config(**{"secagg.num-shares": 5, "secagg.reconstruction-threshold": 3})
    nodes = list(range(1, NODES + 1))
    _, updates = _plain_fedavg(config, initial, nodes)
    drop = {(secagg.COLLECT, 6)}
    grid, outcome, examples = _secure(config, initial, nodes, drop)
    modulus = config["secagg.modulus-range"]
    scale = max(examples.values())
    # 1. every masked vector is far from the node's own quantised update: as far as uniform noise mod m
    for reply in grid.received:
        if secagg.MASKED not in reply.content.array_records:
            continue
        node = reply.metadata.src_node_id
        masked = reply.content.array_records[secagg.MASKED]["vector"].numpy()
        own = flower_adapter.quantize(
            updates[node] * examples[node] / scale,
            config["secagg.clipping-range"],
            config["secagg.quantization-range"],
            seed=0,
        )
        distance = np.minimum((masked - own) % modulus, (own - masked) % modulus)
        assert np.mean(distance < config["secagg.quantization-range"]) < 0.01, f"node {node}'s vector is readable"
        assert abs(np.mean(distance) / modulus - 0.25) < 0.01  # a uniform mask: mean distance m/4
    # 2. no private key or self-mask seed travels in any reply, in clear
    blobs = [
        value
        for reply in grid.received
        for record in reply.content.config_records.values()
        for item in record.values()
        for value in (item if isinstance(item, list) else [item])
        if isinstance(value, bytes)
    ]
    for node, held in grid.secrets.items():
        for secret in held.values():
            assert not any(secret in blob for blob in blobs), f"a secret of node {node} reached the server"
    # 3. the server holds enough shares of a survivor's self-mask seed only, of a dropped node's mask key only
    counts: dict[tuple[str, int], int] = {}
    for reply in grid.received:
        record = reply.content.config_records.get(secagg.RECORD)
        if record is not None and "owners" in record:
            for owner, kind in zip(record["owners"], record["kinds"]):
                counts[(kind, owner)] = counts.get((kind, owner), 0) + 1
    for node in nodes:
        kind_needed, kind_never = ("key", "seed") if node == 6 else ("seed", "key")
        assert counts.get((kind_never, node), 0) == 0, f"the server got {kind_never} shares of node {node}"
        assert counts.get((kind_needed, node), 0) >= 3
    assert outcome.aggregate is not None


@pytest.mark.fast
def test_a_node_refuses_a_server_that_lowers_the_reconstruction_threshold(initial) -> None:
    nodes = list(range(1, NODES + 1))
    grid = RecordingGrid(_config(**{"secagg.reconstruction-threshold": 6}))  # the nodes' run config
    examples = {node: _examples(_config(), node) for node in nodes}
    lowered = _config(**{"secagg.reconstruction-threshold": 2})  # what this server claims
    with flower_adapter.server_app_identity(run_id=1):
        outcome = secagg.secure_train(grid, _train_messages(initial, nodes), examples, lowered, 1, 60.0)
    assert outcome.aggregate is None and sorted(outcome.failures) == nodes
    assert "threshold 2 for 10 neighbours, this node needs 6" in outcome.failures[1]
    assert not any(reply.has_content() and secagg.MASKED in reply.content.array_records for reply in grid.received)


@pytest.mark.fast
def test_a_node_refuses_a_stage_before_its_setup(initial) -> None:
    config = _config()
    grid = RecordingGrid(config)
    with flower_adapter.server_app_identity(run_id=1):
        content = RecordDict({secagg.RECORD: ConfigRecord({"round": 1})})
        replies = grid.send_and_receive(
            [Message(content, dst_node_id=1, message_type=f"train.{secagg.SHARE}", group_id="1")], timeout=1
        )
    assert replies[0].has_error() and "before secagg_setup" in replies[0].error.reason


# -- the run config -----------------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "fedmedian"}, "strategy 'fedmedian' needs every node's update, which secagg hides"),
        ({"strategy": "krum"}, "strategy 'krum' needs every node's update"),
        ({"outlier-factor": 5.0}, "'outlier-factor' screens each node's update"),
        ({"secagg.num-shares": 4}, "'secagg.num-shares' must be 0 (every sampled node) or an odd number"),
        ({"secagg.num-shares": 5, "secagg.reconstruction-threshold": 6}, "'secagg.reconstruction-threshold' must be"),
        ({"secagg.modulus-range": 1000}, "'secagg.modulus-range' must be a power of two"),
        ({"secagg.quantization-range": 2**33}, "'secagg.quantization-range' must be between 1 and 2**31 - 1"),
        ({"secagg.clipping-range": 0.0}, "'secagg.clipping-range' must be above 0"),
        ({"secagg.quantization-range": 2**29}, "so the masked sum would wrap around"),
    ],
)
def test_what_secagg_cannot_do_is_refused_in_one_line(overrides: dict[str, Any], message: str) -> None:
    from fedplug.strategies import check_strategy  # a strategy declares whether it composes with secagg

    with pytest.raises(ConfigError) as error:
        check_strategy(_config(**overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("chosen", "message"),
    [
        ("server-fixed", "dp=server-fixed clips each update on the server, which secagg hides from it"),
        ("server-adaptive", "dp=server-adaptive clips each update on the server"),
        ("client-adaptive", "dp=client-adaptive needs each node's clipped bit, which secagg would show the server"),
    ],
)
def test_secagg_refuses_the_dp_modes_it_cannot_combine_with_in_one_line(chosen: str, message: str) -> None:
    from fedplug.plan import plan_run

    with pytest.raises(ConfigError) as error:
        plan_run(
            "numpy",
            {"num-supernodes": NODES, "secagg": True, "dp": chosen, "dp.noise-multiplier": 0.5},
            create=False,
        )
    text = str(error.value)
    assert message in text and "use dp=client-fixed with secagg" in text
    assert "\n" not in text and error.value.exit_code == 2


@pytest.mark.fast
def test_secagg_keys_default_to_off_and_flowers_quantisation() -> None:
    config = resolve(BACKEND, {})
    assert config["secagg"] is False and config["secagg.modulus-range"] == 2**32
    assert resolve(BACKEND, {"strategy": "krum", "num-supernodes": 10})["strategy"] == "krum"  # without secagg: fine


# -- end to end -------------------------------------------------------------------------------


def _run(out: Path, rounds: int = 1, **run_config: Any) -> dict[str, np.ndarray]:
    fedplug.api.run(
        "numpy",
        rounds=rounds,
        nodes=NODES,
        out=out,
        quiet=True,
        run_config={"hidden-dims": "16", "fraction-evaluate": 0.0, "centralized-eval": False, **run_config},
    )
    return dict(np.load(out / "weights.npz"))


def test_a_secagg_run_with_two_nodes_dropping_after_sharing_keys_gives_plain_fedavgs_model(tmp_path: Path) -> None:
    # partitions 3 and 8 run a backend whose train() raises: they set up and share keys, then never send a vector
    dropping = {"node-backends": "3:failing_train,8:failing_train"}
    plain = _run(tmp_path / "plain", **dropping)
    secure = _run(tmp_path / "secure", secagg=True, **dropping)
    record = json.loads((tmp_path / "secure" / "metrics.json").read_text())["rounds"][1]
    assert record["train-nodes"] == NODES - 2 and [f["partition"] for f in record["train-failures"]] == [3, 8]
    assert all(f["reason"].startswith("secagg_collect: train raised RuntimeError") for f in record["train-failures"])
    config = _config()
    examples = {node: _examples(config, node) for node in range(1, NODES + 1)}
    bound = _bound(config, examples, [node for node in examples if node - 1 not in (3, 8)])
    for name, array in plain.items():
        slack = np.spacing(np.abs(array).astype(np.float32))  # the global model is float32: one ulp each side
        assert np.all(np.abs(secure[name] - array) <= bound + slack), name
    assert any(not np.array_equal(secure[name], plain[name]) for name in plain)  # the masked path, not the plain


def test_a_secagg_run_of_a_mixed_federation_learns(tmp_path: Path) -> None:
    # numpy nodes and PyTorch nodes mask the same flattened canonical weights
    fedplug.api.run(
        "numpy",
        rounds=1,
        nodes=4,
        node_backends="2-3:torch",
        out=tmp_path,
        quiet=True,
        run_config={"hidden-dims": "16", "fraction-evaluate": 0.0, "secagg": True, "lr": 0.1},
    )
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert rounds[1]["train-nodes"] == 4 and rounds[1]["train-backends"] == {"numpy": 2, "torch": 2}
    assert rounds[1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"] + 0.2
