"""Differential privacy (``fedplug.dp``): accounting, sampling, refusals, and shared simulation runs.

The accounting is checked against dp-accounting computed here independently (and, without client
subsampling, against Flower's own ``RdpAccountant``); the runs (numpy backend, embedded digits, 10
nodes, 3 rounds) check that each central mechanism learns within a stated accuracy loss at a stated
epsilon, that ``dp.max-epsilon`` stops at the right round, that resume is bit-identical with DP on,
and that local DP works in a federation of two backends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedplug import dp
from fedplug.config import CORE_DEFAULTS
from fedplug.errors import ConfigError
from fedplug.flower_adapter import message_for_client_app
from fedplug.plan import plan_run
from fedplug.rounds import poisson_draw
from fedplug.testing.runs import assert_same_run, fedplug, read_rounds

QUIET = {"FEDPLUG_PLUGINS": ""}
NM = "dp.noise-multiplier"
DELTA = 1e-5
ROUNDS = 3
NODES = 10


def rdp_epsilon(z: float, q: float, rounds: int, delta: float = DELTA) -> float:
    """dp-accounting's RDP epsilon of ``rounds`` (Poisson-subsampled, if q < 1) Gaussian releases."""
    event: Any = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    if rounds == 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def config(**values: Any) -> dict[str, Any]:
    return {**CORE_DEFAULTS, "num-supernodes": NODES, "num-server-rounds": ROUNDS, **values}


# -- accounting -------------------------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(("z", "q"), [(0.5, 1.0), (1.0, 1.0), (2.0, 0.5)])
def test_epsilon_matches_an_independent_dp_accounting_computation(z: float, q: float) -> None:
    accounting = dp.privacy(config(dp="server-fixed", **{"dp.noise-multiplier": z, "fraction-train": q}))
    assert accounting is not None and accounting.sampling == q
    for rounds in (1, 3, 10):
        assert accounting.epsilon(rounds) == pytest.approx(rdp_epsilon(z, q, rounds), rel=1e-9)
    assert accounting.record(0) == {"epsilon": 0.0, "delta": DELTA}


@pytest.mark.fast
def test_without_subsampling_epsilon_matches_flowers_rdp_accountant() -> None:
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    flower = RdpAccountant(
        PrivacyConfig(DELTA, NODES, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    accounting = dp.privacy(config(dp="client-fixed", **{"dp.noise-multiplier": 0.8}))
    assert accounting is not None
    for rounds in range(1, 6):
        flower.compose(GaussianPrivacyEvent(0.8, NODES, NODES))
        assert accounting.epsilon(rounds) == pytest.approx(flower.get_epsilon(DELTA), rel=1e-9)


@pytest.mark.fast
def test_adaptive_clipping_is_accounted_with_the_clipped_count_at_sensitivity_one() -> None:
    z, s = 0.6, 0.5  # s: Flower's default clipped-count stddev, 10 nodes / 20
    update = (z**-2 - (2 * s) ** -2) ** -0.5  # the update's multiplier, as Flower splits z
    assert dp.accounted_multiplier(config(dp="server-adaptive", **{"dp.noise-multiplier": z})) == pytest.approx(
        (update**-2 + s**-2) ** -0.5
    )
    assert dp.accounted_multiplier(config(dp="server-fixed", **{"dp.noise-multiplier": z})) == z


@pytest.mark.fast
@pytest.mark.parametrize(
    ("chosen", "q", "target"), [("server-fixed", 1.0, 8.0), ("client-fixed", 1.0, 3.0), ("client-adaptive", 1.0, 60.0)]
)
def test_a_target_epsilon_gives_the_smallest_noise_that_reaches_it(chosen: str, q: float, target: float) -> None:
    values = config(dp=chosen, **{"dp.epsilon": target, "fraction-train": q, "num-server-rounds": 5})
    z = dp.noise_for_epsilon(values)
    spent = rdp_epsilon(dp.accounted_multiplier(values, z), q, 5)
    assert target * 0.99 < spent <= target


@pytest.mark.fast
def test_max_epsilon_allows_the_rounds_within_it() -> None:
    z = 1.0
    limit = (rdp_epsilon(z, 1.0, 4) + rdp_epsilon(z, 1.0, 5)) / 2
    accounting = dp.privacy(config(dp="server-fixed", **{"dp.noise-multiplier": z, "dp.max-epsilon": limit}))
    assert accounting is not None
    assert accounting.rounds_within_budget(10) == 4 and accounting.rounds_within_budget(3) == 3
    assert "round 5 would spend epsilon" in accounting.stop_reason(4)


# -- sampling, aggregation, noise --------------------------------------------------------


@pytest.mark.fast
def test_poisson_draw_takes_each_partition_independently_seeded_by_seed_and_round() -> None:
    population = list(range(100))
    draws = [poisson_draw(population, 0.3, 7, server_round) for server_round in range(1, 201)]
    assert draws[0] == poisson_draw(population, 0.3, 7, 1) != poisson_draw(population, 0.3, 8, 1)
    sizes = [len(drawn) for drawn in draws]
    assert len(set(sizes)) > 5  # the count varies: Poisson, not a fixed count
    assert abs(np.mean(sizes) - 30) < 1.5
    counts = np.bincount(np.concatenate(draws), minlength=100)
    assert abs(counts.mean() / 200 - 0.3) < 0.01 and counts.min() > 30  # every partition at the same rate


@pytest.mark.fast
def test_the_dp_aggregate_is_the_sum_of_updates_over_the_expected_count_with_weight_one() -> None:
    from flwr.serverapp.strategy import FedAvg

    shim = dp.FixedDenominator(FedAvg(), expected=4.0)
    g = np.zeros(3, dtype=np.float32)
    shim.current = [g]
    updates = [np.array([1.0, 0, 0], np.float32), np.array([0, 2.0, 0], np.float32)]
    replies = []
    for i, update in enumerate(updates):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(g + update)}),
                "metrics": MetricRecord({"num-examples": 10 * (i + 1)}),
                "config": ConfigRecord(),
            }
        )
        replies.append(
            message_for_client_app(
                content,
                message_type="train",
                run_id=1,
                message_id=str(i),
                dst_node_id=0,
                src_node_id=i + 1,
                group_id="1",
            )
        )
    aggregated, _ = shim.aggregate_train(1, replies)
    assert aggregated is not None
    np.testing.assert_allclose(aggregated["w"].numpy(), (updates[0] + updates[1]) / 4.0, rtol=1e-6)
    assert [reply.content["metrics"]["num-examples"] for reply in replies] == [1, 1]


@pytest.mark.fast
def test_seeded_noise_repeats_and_leaves_numpys_global_generator_as_it_was() -> None:
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    with dp.seeded(42, 3):
        first = np.random.normal(size=5)
    with dp.seeded(42, 3):
        again = np.random.normal(size=5)
    with dp.seeded(42, 4):
        other = np.random.normal(size=5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


@pytest.mark.fast
def test_the_servers_noise_key_is_secret_unless_a_noise_seed_is_set_and_the_checkpoint_keeps_it() -> None:
    from flwr.serverapp.strategy import FedAvg

    from fedplug.checkpoint import _state_layout, restore_strategy

    values = config(dp="server-fixed", **{"dp.noise-multiplier": 0.5})
    one, two = dp.wrap(FedAvg(), values), dp.wrap(FedAvg(), values)
    assert not np.array_equal(one.noise_key, two.noise_key) and one.noise_key.size == 4  # 128 bits, never the seed
    assert "noise_key" in one.checkpoint_state
    layout, arrays = _state_layout(one)
    restore_strategy(two, layout, arrays)  # a resumed run draws the noise the interrupted one would have
    np.testing.assert_array_equal(two.noise_key, one.noise_key)
    seeded = {**values, "dp.noise-seed": 3}
    np.testing.assert_array_equal(dp.wrap(FedAvg(), seeded).noise_key, dp.wrap(FedAvg(), seeded).noise_key)


@pytest.mark.fast
def test_local_dp_noise_has_the_configured_stddev() -> None:
    mod = dp.local_mod(config(dp="local", **{"dp.noise-multiplier": 0.5, "dp.clipping-norm": 2.0}))
    stddev = mod.sensitivity * np.sqrt(2 * np.log(1.25 / mod.delta)) / mod.epsilon  # type: ignore[attr-defined]
    assert stddev == pytest.approx(0.5 * 2 * 2.0)


@pytest.mark.fast
def test_the_client_mod_adds_secret_local_noise_to_the_clipped_update() -> None:
    from flwr.app import Context, Message

    values = config(dp="local", **{"dp.noise-multiplier": 0.5, "dp.clipping-norm": 1.0})
    g = np.zeros(20_000, dtype=np.float32)
    sent = RecordDict({"arrays": ArrayRecord({"w": Array(g)}), "config": ConfigRecord({"server-round": 3})})
    message = message_for_client_app(sent, message_type="train", run_id=1, message_id="m", dst_node_id=1, group_id="3")
    update = np.zeros_like(g)
    update[0] = 10.0  # norm 10: clipped to 1

    def train(msg: Any, context: Any) -> Any:
        content = RecordDict({"arrays": ArrayRecord({"w": Array(g + update)}), "metrics": MetricRecord({"loss": 1.0})})
        return Message(content=content, reply_to=msg)

    def reply(partition: int) -> np.ndarray:
        context = Context(1, 1, {"partition-id": partition}, RecordDict(), values)  # type: ignore[arg-type]
        return next(iter(dp.client_mod(message, context, train).content.array_records.values()))["w"].numpy()

    first, again = reply(0), reply(0)
    assert not np.array_equal(first, again)  # a fresh secret key for every update: not derivable from the seed
    values["dp.noise-seed"] = 7  # reproducible on purpose: seeded by it, the round and the partition
    first, again, other = reply(0), reply(0), reply(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.std(first[1:]) == pytest.approx(0.5 * 2 * 1.0, rel=0.05)  # z * sensitivity (twice the clipping norm)
    assert abs(first[0] - 1.0) < 5 * 1.0  # the clipped update (1.0) plus one noise draw


# -- refusals, before anything starts ------------------------------------------------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"dp": "server-fixed", "strategy": "krum", NM: 0.5}, "strategy 'krum' aggregates otherwise"),
        ({"dp": "client-fixed", "strategy": "fedmedian", NM: 0.5}, "use fedavg or fedprox, or dp=local"),
        ({"dp": "server-fixed", "strategy": "fedadam", NM: 0.5}, "strategy 'fedadam' aggregates otherwise"),
        ({"dp": "server-fixed", "clip-norm": 5.0, NM: 0.5}, "leave clip-norm at 0"),
        ({"dp": "server-adaptive", "fraction-train": 0.5, NM: 0.5}, "Poisson sampling makes private"),
        ({"dp": "server-fixed", "outlier-factor": 10.0, NM: 0.5}, "set outlier-factor=0"),
        ({"dp": "server-fixed"}, "needs dp.noise-multiplier (e.g. 1.0) or a target dp.epsilon"),
        ({"dp": "server-fixed", NM: 1.0, "dp.epsilon": 3.0}, "not both"),
        ({"dp": "server-fixed", NM: 1.0, "dp.max-epsilon": 1.0}, "below one round's epsilon"),
        ({"dp": "server-adaptive", NM: 1.5}, "below 2 * dp.clipped-count-stddev"),
        ({"dp": "local", NM: 1.0, "dp.delta": 0.0}, "'dp.delta' must be between 0 and 1"),
        ({"dp": "gaussian"}, "'dp' must be off or one of: server-fixed"),
    ],
)
def test_unsound_or_impossible_settings_are_refused_in_one_line(values: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        plan_run("numpy", {"num-supernodes": NODES, **values}, create=False)
    assert expected in str(error.value) and "\n" not in str(error.value) and error.value.exit_code == 2


@pytest.mark.fast
def test_the_command_refuses_with_exit_code_2_and_one_line() -> None:
    done = fedplug(
        "run", "numpy", "--strategy", "krum", "--run-config", "dp='server-fixed' dp.noise-multiplier=1.0", env=QUIET
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "dp=server-fixed calibrates its noise" in done.stderr


@pytest.mark.fast
def test_a_target_epsilon_sets_the_noise_in_the_plan_and_says_so() -> None:
    plan = plan_run("numpy", {"num-supernodes": NODES, "dp": "server-fixed", "dp.epsilon": 10.0}, create=False)
    z = float(plan.config["dp.noise-multiplier"])
    assert rdp_epsilon(z, 1.0, 5) <= 10.0 < rdp_epsilon(z * 0.99, 1.0, 5)  # numpy's default: 5 rounds
    assert any("epsilon 10 at delta 1e-05 after 5 rounds" in note for note in plan.notes)
    assert plan.config["outlier-factor"] == 0.0


# -- shared simulation runs ---------------------------------------------------------------

Z = 0.2
"""The runs' noise multiplier: epsilon 77.4 at delta 1e-5 after 3 rounds (10 nodes, all train)."""
MAX_LOSS = {"server-fixed": 0.15, "client-fixed": 0.3, "server-adaptive": 0.15, "client-adaptive": 0.15}
"""The accuracy each DP run may lose against the same run without DP (stated in docs/privacy.md). The client-fixed
run trains a Poisson sample of half the nodes per round (epsilon 71.1): twice the noise, on half the updates."""
SAMPLED = {"client-fixed": 0.5}
"""The runs with client subsampling (fraction-train), Poisson under DP."""
BASE = ["--nodes", str(NODES), "--rounds", str(ROUNDS), "--seed", "5"]


def run(out: Path, *args: str, env: dict[str, str] = QUIET) -> None:
    done = fedplug("run", "numpy", "--out", str(out), *args, env=env)
    assert done.returncode == 0, f"fedplug run failed:\n{done.stdout}\n{done.stderr}"
    (out / "stdout.txt").write_text(done.stdout)


def dp_args(chosen: str, extra: str = "") -> list[str]:
    # dp.noise-seed: reproducible noise, so that two runs (server- and client-side clipping) can be compared
    settings = f"dp='{chosen}' dp.noise-multiplier={Z} dp.clipping-norm=2.0 dp.noise-seed=11 {extra}"
    return [*BASE, "--run-config", settings.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dp")
    limit = (rdp_epsilon(Z, 1.0, 2) + rdp_epsilon(Z, 1.0, 3)) / 2  # round 3 would exceed it
    plan = {
        "none": BASE,
        "server-fixed": dp_args("server-fixed", f"dp.max-epsilon={limit}"),
        "client-fixed": ["--fraction-train", "0.5", *dp_args("client-fixed")],
        "server-adaptive": dp_args("server-adaptive"),
        "client-adaptive": dp_args("client-adaptive"),
    }
    for name, args in plan.items():
        run(root / name, *args)
    return {name: root / name for name in plan}


def test_central_dp_learns_within_the_stated_accuracy_loss(runs: dict[str, Path]) -> None:
    base = {r["round"]: r["centralized-accuracy"] for r in read_rounds(runs["none"])}
    assert base[ROUNDS] > 0.8
    for name in ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive"):
        rounds = read_rounds(runs[name])
        last = rounds[-1]
        accuracies = [(r["round"], r.get("centralized-accuracy")) for r in rounds]
        assert last["centralized-accuracy"] >= base[last["round"]] - MAX_LOSS[name], (name, accuracies, base)
        assert last["centralized-accuracy"] > 0.5, name
        for record in rounds:  # every round reports the budget spent so far
            assert record["delta"] == DELTA
            q = SAMPLED.get(name, 1.0)
            expected = rdp_epsilon(dp.accounted_multiplier(config(dp=name), Z), q, record["round"])
            assert record["epsilon"] == pytest.approx(expected, abs=1e-5)
        if name in SAMPLED:  # Poisson sampling: each node independently, so the count varies
            assert len({len(r["train-partitions"]) for r in rounds[1:]}) > 1, rounds
        assert "ε " in (runs[name] / "stdout.txt").read_text()
        assert "differential privacy: epsilon" in (runs[name] / "stdout.txt").read_text()


def test_clipping_on_the_nodes_gives_the_model_clipping_on_the_server_gives(runs: dict[str, Path]) -> None:
    """Adaptive clipping on the nodes (Flower's mod) and on the server (its wrapper): the same clipped
    updates, the same seeded noise, so the same model, to the bit."""
    assert_same_run(runs["server-adaptive"], runs["client-adaptive"], "model.npz")


def test_max_epsilon_stops_before_the_round_that_would_exceed_it(runs: dict[str, Path]) -> None:
    rounds = read_rounds(runs["server-fixed"])
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert "round 3 would spend epsilon" in rounds[-1]["privacy-stop"]
    out = " ".join((runs["server-fixed"] / "stdout.txt").read_text().split())  # the summary's caption wraps
    assert out.count("stopped after round 2") == 2  # after the round line, and under the summary
    assert json.loads((runs["server-fixed"] / "status.json").read_text())["status"] == "finished"


def test_client_side_clipping_reports_its_norm_bit_and_adaptive_clipping_moves_the_norm(runs: dict[str, Path]) -> None:
    from fedplug.checkpoint import latest

    saved = latest(runs["client-adaptive"])
    assert saved is not None
    norm = float(saved.strategy["arrays"]["clipping_norm/0"])
    assert norm != 2.0 and norm > 0  # the clipping norm adapted, and the checkpoint keeps it


def test_resume_is_bit_identical_with_dp_on(runs: dict[str, Path], tmp_path: Path) -> None:
    part = tmp_path / "part"
    args = dp_args("client-adaptive")
    run(part, *[a if a != str(ROUNDS) else "2" for a in args])
    done = fedplug("run", "--resume", str(part), "--rounds", str(ROUNDS), env=QUIET)
    assert done.returncode == 0, done.stderr
    assert_same_run(runs["client-adaptive"], part, "model.npz")


def test_local_dp_in_a_federation_of_two_backends(tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    args = ["--nodes", "4", "--rounds", "2", "--node-backends", "2-3:mlx"]
    settings = "dp='local' dp.noise-multiplier=0.002 dp.clipping-norm=1.0"
    run(out, *args, "--run-config", settings, env={"FEDPLUG_PLUGINS": "mlx"})
    rounds = read_rounds(out)
    assert rounds[-1]["train-backends"] == {"numpy": 2, "mlx": 2}
    assert rounds[-1]["epsilon"] == pytest.approx(rdp_epsilon(0.002, 1.0, 2), abs=1e-5)
    assert rounds[-1]["centralized-accuracy"] > 0.5


@pytest.mark.fast
@pytest.mark.parametrize("chosen", ["server-fixed", "server-adaptive"])
def test_an_update_of_exactly_zero_does_not_stop_server_side_clipping(chosen: str) -> None:
    """Flower's clipping divides by the update's norm: a node that returns the global model unchanged
    (no data to learn from, lr too small for float32) would end the run with ZeroDivisionError."""
    from flwr.serverapp.strategy import FedAvg

    strategy = dp.wrap(FedAvg(), config(dp=chosen, **{"dp.noise-multiplier": 0.1}))
    g = {"w": np.ones(4, dtype=np.float32)}
    strategy.wrapper.current_arrays = ArrayRecord({"w": Array(g["w"])})  # what configure_train records
    strategy.wrapper.strategy.current = [g["w"]]
    replies = []
    for node, update in enumerate((np.zeros(4, np.float32), np.full(4, 0.5, np.float32))):
        content = RecordDict(
            {"arrays": ArrayRecord({"w": Array(g["w"] + update)}), "metrics": MetricRecord({"num-examples": 5})}
        )
        replies.append(
            message_for_client_app(
                content, message_type="train", run_id=1, message_id=str(node), dst_node_id=0, group_id="1"
            )
        )
    aggregated, _ = strategy.aggregate_train(1, replies)
    assert aggregated is not None and np.all(np.isfinite(aggregated["w"].numpy()))
    expected = 1 + 0.5 / NODES  # the one non-zero update over the expected 10 nodes, plus noise of 0.1 * 1 / 10
    assert np.all(np.abs(aggregated["w"].numpy() - expected) < 5 * 0.1 / NODES)


@pytest.mark.fast
def test_without_dp_accounting_the_server_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # `import dp_accounting` fails
    dp._epsilon.cache_clear()
    with pytest.raises(ConfigError, match=r"needs dp-accounting where the ServerApp runs: pip install"):
        dp._epsilon(1.0, 1.0, DELTA, 1)
    with pytest.raises(ConfigError, match=r"dp=server-fixed needs dp-accounting"):
        plan_run("numpy", {"dp": "server-fixed", "dp.noise-multiplier": 1.0}, create=False)


def test_secagg_runs_with_central_and_local_dp_learn_and_report_the_accounted_epsilon(tmp_path: Path) -> None:
    """With secagg=true (docs/secagg.md): dp=client-fixed, each node clips and masks, the server noises the
    unmasked sum, half the nodes per round by Poisson sampling; dp=local, each node noises before masking."""
    base = ["--seed", "5", "--fraction-evaluate", "0"]
    settings = "secagg=true hidden-dims='16' lr=0.1 dp.clipping-norm=2.0"
    central = ["--nodes", str(NODES), "--rounds", "2", "--fraction-train", "0.5"]
    run(tmp_path / "central", *base, *central, "--run-config", f"{settings} dp='client-fixed' {NM}=0.2")
    local = ["--nodes", "4", "--rounds", "1"]  # a small federation: the noise itself is checked in test_secagg.py
    run(tmp_path / "local", *base, *local, "--run-config", f"{settings} dp='local' {NM}=0.002")
    for name, z, q in (("central", 0.2, 0.5), ("local", 0.002, 1.0)):
        rounds = read_rounds(tmp_path / name)
        assert [r["epsilon"] for r in rounds] == pytest.approx(
            [rdp_epsilon(z, q, r["round"]) for r in rounds], abs=1e-5
        )
        assert rounds[-1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"] + 0.2, (name, rounds)
        assert all(r["train-nodes"] >= 2 and not r.get("train-failures") for r in rounds[1:]), (name, rounds)
    sampled = [len(r["train-partitions"]) for r in read_rounds(tmp_path / "central")[1:]]
    assert all(count < NODES for count in sampled), sampled  # Poisson sampling holds under secagg
