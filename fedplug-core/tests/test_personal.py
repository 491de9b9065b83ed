"""Personalised FL (fedplug.personal): FedPer's head on every backend's layout, the node steps, the evaluation
of the personal models in metrics.json, FedPer and Ditto beating FedAvg on non-IID digits, and exact resume;
FedBN's normalisation arrays on lenet-bn and its refusal of a model without them.

The comparison runs once (module fixture): 10 nodes, dirichlet alpha 0.1, 2 rounds, hidden-dims 32, numpy (FedPer
with half of the nodes on torch).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedplug import DataSpec
from fedplug.capabilities import NodeStep
from fedplug.config import resolve
from fedplug.display import round_line, summary_table
from fedplug.errors import ConfigError
from fedplug.models import NORM_ARRAYS, canonical_shapes, norm_keys
from fedplug.personal import ditto_model, ditto_step, fedbn_step, fedper_model, fedper_step, head_keys
from fedplug.plugins import get_backend
from fedplug.strategies import check_strategy
from fedplug.testing import StrategyConformance
from fedplug.testing.runs import assert_killed_run_resumes_bit_identical, fedplug, read_rounds

BACKENDS = ("numpy", "torch", "jax", "mlx")


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("model_name", ["mlp", "lenet", "lenet-bn"])
def test_the_head_is_the_last_layer_weight_and_bias_in_every_backends_layout(backend_name, model_name) -> None:
    backend = get_backend(backend_name)
    spec = DataSpec((1, 28, 28), 7)
    weights = backend.get_weights(backend.build_model(model_name, spec, resolve(backend, {"hidden-dims": "16"})))
    weight, bias = (weights[key] for key in head_keys(weights))
    # the last Linear/Dense layer: 7 outputs, in whichever orientation the backend's canonical layout uses
    assert bias.shape == (7,) and weight.ndim == 2 and 7 in weight.shape, {k: v.shape for k, v in weights.items()}
    before = list(weights)[: -len(head_keys(weights))]
    assert all(weights[key].shape != (7,) for key in before)


@pytest.mark.fast
@pytest.mark.parametrize("name", ["fedper", "ditto", "fedbn"])
def test_personalised_strategies_pass_the_strategy_suite(name, tmp_path) -> None:
    suite = type(f"Test_{name}", (StrategyConformance,), {"strategy_name": name, "nodes": 5})()
    suite.check_all(tmp_path)  # every check of the suite, the node step's included


def _weights(value: float) -> dict[str, np.ndarray]:
    return {
        "w1": np.full((3, 2), value, np.float32),
        "b1": np.full(3, value, np.float32),
        "w2": np.full((2, 3), value, np.float32),
        "b2": np.full(2, value, np.float32),
    }


CONFIG = {"lr": 0.1, "local-epochs": 1, "batch-size": 10, "server-round": 1, "partition-id": 0}


@pytest.mark.fast
def test_fedper_keeps_the_trained_head_on_the_node_and_sends_the_global_head() -> None:
    step = NodeStep(_weights(0.0), _weights(1.0), {}, {}, CONFIG, 20)
    fedper_step(step)
    assert sorted(step.state) == ["b2", "w2"] and all(np.all(v == 1.0) for v in step.state.values())
    assert np.all(step.after["w1"] == 1.0) and np.all(step.after["w2"] == 0.0) and np.all(step.after["b2"] == 0.0)
    personal = fedper_model(_weights(5.0), step.state)  # the next round's global body with the node's own head
    assert np.all(personal["w1"] == 5.0) and np.all(personal["w2"] == 1.0)


@pytest.mark.fast
def test_ditto_trains_the_personal_model_and_pulls_it_toward_the_global_one() -> None:
    trained_from: list[float] = []

    def train(start, config):
        trained_from.append(float(start["w1"][0, 0]))
        return {key: value + 1.0 for key, value in start.items()}

    config = {**CONFIG, "strategy.lambda": 0.5}
    step = NodeStep(_weights(0.0), _weights(0.3), {}, {"w1": np.full((3, 2), 2.0, np.float32)}, config, 20, train=train)
    ditto_step(step)
    assert trained_from == [2.0]  # from its personal model where it has one; the global one elsewhere
    keep = (1 + 0.1 * 0.5) ** -2  # K = 2 proximal steps v <- (v + lr * lambda * w) / (1 + lr * lambda)
    assert np.allclose(step.state["w1"], keep * 3.0) and np.allclose(step.state["b1"], keep * 1.0)
    assert np.all(step.after["w1"] == 0.3)  # the global model's training is FedAvg's
    assert np.allclose(ditto_model(_weights(9.0), step.state)["w2"], keep)


@pytest.mark.fast
def test_lenet_bn_has_normalisation_arrays_first_and_the_head_last() -> None:
    shapes = canonical_shapes("lenet-bn", DataSpec((1, 28, 28), 10), {})
    norm = norm_keys(shapes)
    assert norm == list(shapes)[: len(norm)] == [f"norm.{i}.{a}" for i in (0, 1) for a in NORM_ARRAYS]
    assert [shapes[key] for key in head_keys(dict.fromkeys(shapes))] == [(10, 84), (10,)]
    assert norm_keys(canonical_shapes("lenet", DataSpec((1, 28, 28), 10), {})) == []


@pytest.mark.fast
def test_fedbn_keeps_the_trained_normalisation_arrays_on_the_node_and_sends_the_global_ones() -> None:
    def weights(value: float) -> dict[str, np.ndarray]:
        return {
            "norm.0.weight": np.full(3, value, np.float32),
            "norm.0.running_var": np.full(3, value, np.float32),
            **_weights(value),
        }

    step = NodeStep(weights(0.0), weights(1.0), {}, {}, CONFIG, 20)
    fedbn_step(step)
    assert sorted(step.state) == ["norm.0.running_var", "norm.0.weight"]
    assert all(np.all(v == 1.0) for v in step.state.values())
    assert all(np.all(step.after[key] == (0.0 if key.startswith("norm.") else 1.0)) for key in step.after)
    assert list(step.after) == list(weights(0.0))
    personal = fedper_model(weights(5.0), step.state)  # the next round's global weights with the node's own norm
    assert np.all(personal["norm.0.weight"] == 1.0) and np.all(personal["w1"] == 5.0)


@pytest.mark.fast
def test_fedbn_refuses_a_model_without_normalisation_layers_before_the_run() -> None:
    numpy = get_backend("numpy")
    for model in ("mlp", "lenet"):
        with pytest.raises(ConfigError, match="has none: use --model lenet-bn"):
            check_strategy(resolve(numpy, {"strategy": "fedbn", "model": model}))
    check_strategy(resolve(numpy, {"strategy": "fedbn", "model": "lenet-bn"}))


@pytest.mark.fast
def test_the_round_line_and_summary_show_the_personal_models_of_personalised_strategies_only() -> None:
    from rich.console import Console

    record = {"round": 1, "evaluate-loss": 1.2, "evaluate-accuracy": 0.6, "seconds": 1.0}
    personal = {**record, "personal-loss": 0.2013, "personal-accuracy": 0.935}
    assert "│ eval 1.200  60.0% │ personal 0.201  93.5% │ 1.0 s" in round_line(personal)
    assert "personal" not in round_line(record)

    def summary(rounds: list[dict]) -> str:
        console = Console(width=120, record=True)
        console.print(summary_table(rounds))
        return console.export_text()

    assert "pers acc" in summary([{"round": 0, "seconds": 0.1}, personal]) and "0.9350" in summary([personal])
    assert "personal" not in summary([record])


ARGS = ("--rounds", "2", "--nodes", "10", "--partitioner", "dirichlet")
CONFIG_ARGS = ("--run-config", "partitioner.alpha=0.1 hidden-dims='32'")


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict[str, list[dict]]:
    """FedAvg, FedPer and Ditto on the same non-IID split (numpy; FedPer in a federation of numpy and torch nodes):
    each run's rounds."""
    found = {}
    for strategy in ("fedavg", "fedper", "ditto"):
        out = tmp_path_factory.mktemp(strategy)
        mixed = ("--node-backends", "0-4:numpy,5-9:torch") if strategy == "fedper" else ()
        done = fedplug("run", "numpy", *mixed, "--strategy", strategy, *ARGS, *CONFIG_ARGS, "--out", str(out))
        assert done.returncode == 0, done.stderr[-2000:]
        found[strategy] = read_rounds(out)
    return found


def test_personalised_strategies_record_global_and_personal_metrics(compared) -> None:
    assert not any(key.startswith("personal-") for r in compared["fedavg"] for key in r)
    assert set(compared["fedper"][-1]["partition-backends"].values()) == {"numpy", "torch"}
    for strategy in ("fedper", "ditto"):
        last = compared[strategy][-1]
        per_node = last["personal-accuracy-per-node"]
        assert sorted(per_node, key=int) == [str(p) for p in last["evaluate-partitions"]]
        assert min(per_node.values()) >= 0.0 and max(per_node.values()) <= 1.0
        assert last["personal-loss"] > 0.0 and "evaluate-accuracy" in last
        # the example-weighted mean lies within the per-node values
        assert min(per_node.values()) <= last["personal-accuracy"] <= max(per_node.values())


def test_fedper_and_ditto_beat_fedavg_on_non_iid_digits(compared) -> None:
    fedavg = compared["fedavg"][-1]["evaluate-accuracy"]  # FedAvg's personal model is the global one
    for strategy in ("fedper", "ditto"):
        personal = compared[strategy][-1]["personal-accuracy"]
        assert personal > fedavg + 0.1, (strategy, personal, fedavg)
    # Ditto's global model is FedAvg's, trained identically
    assert compared["ditto"][-1]["evaluate-accuracy"] == fedavg


MLP = ("--nodes", "2", "--run-config", "hidden-dims='16'")
SMALL_LENET_BN = (
    *("--model", "lenet-bn", "--nodes", "20", "--fraction-train", "0.1", "--fraction-evaluate", "0.5"),
    *("--run-config", "centralized-eval=false"),
)
"""FedBN's resume check: lenet-bn (slow in numpy), so 2 of 20 nodes train; half evaluate, some with a state."""


@pytest.mark.parametrize(
    ("strategy", "rounds", "model_args"),
    [("fedper", "3", MLP), ("ditto", "3", MLP), ("fedbn", "2", SMALL_LENET_BN)],
)
def test_a_killed_personalised_run_resumes_bit_identical(strategy, rounds, model_args, run_fedplug) -> None:
    # killed after round 1: the mlp runs take 3 rounds, so that they are still mid-way when the killer looks
    args = ("--strategy", strategy, "--rounds", rounds, *model_args)
    _, out = run_fedplug("numpy", *args)
    assert_killed_run_resumes_bit_identical("numpy", out, args, "model.npz")
    # the personal models' metrics after round 1 match only if every node got its saved state back
    first, second, *_ = read_rounds(out)[1:]
    assert "personal-accuracy-per-node" in second
    assert set(first["train-partitions"]) & set(second["evaluate-partitions"]), "no node evaluates a saved state"
