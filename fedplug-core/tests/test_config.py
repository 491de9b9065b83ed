"""Run-config parsing, defaults and the errors a user sees."""

from __future__ import annotations

import re

import pytest

from fedplug.builtin_strategies import FLOWER_CLASSES
from fedplug.config import CORE_DEFAULTS, ConfigError, check_partitioner, parse_overrides, resolve
from fedplug.data import make_partitioner
from fedplug.numpy_backend import NumpyBackend
from fedplug.strategies import (
    check_strategy,
    make_strategy,
    sampling,
    strategy_kwargs,
    strategy_parameters,
)

pytestmark = pytest.mark.fast

BACKEND = NumpyBackend()


def test_parse_flwr_run_syntax() -> None:
    assert parse_overrides("lr=0.05 batch-size=64 model='lenet' centralized-eval=false") == {
        "lr": 0.05,
        "batch-size": 64,
        "model": "lenet",
        "centralized-eval": False,
    }


def test_parse_accepts_unquoted_words_and_dotted_keys() -> None:
    assert parse_overrides('model=lenet strategy.proximal-mu=0.1 hidden-dims="32,32"') == {
        "model": "lenet",
        "strategy.proximal-mu": 0.1,
        "hidden-dims": "32,32",
    }


def test_parse_toml_file(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("lr = 0.2\n[strategy]\nproximal-mu = 0.5\n")
    assert parse_overrides(str(path)) == {"lr": 0.2, "strategy.proximal-mu": 0.5}


def test_parse_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="write key=value pairs"):
        parse_overrides("lr 0.05")


def test_backend_defaults_override_core_defaults() -> None:
    config = resolve(BACKEND, {})
    assert config["backend"] == "numpy"
    assert config["num-server-rounds"] == BACKEND.defaults["num-server-rounds"]
    assert config["strategy"] == CORE_DEFAULTS["strategy"]


def test_int_is_accepted_for_float() -> None:
    assert resolve(BACKEND, {"lr": 1})["lr"] == 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": "fast"}, "run-config 'lr' must be float"),
        ({"num-server-rounds": 2.5}, "run-config 'num-server-rounds' must be int"),
        ({"centralized-eval": 1}, "run-config 'centralized-eval' must be bool"),
        ({"rounds": 3}, "unknown run-config key 'rounds'"),
        ({"learning-rate": 0.1}, "unknown run-config key 'learning-rate'"),
        ({"batch-sise": 3}, "did you mean 'batch-size'?"),
        ({"model": "resnet"}, "has no model 'resnet'; choose one of: mlp, lenet"),
        ({"num-supernodes": 0}, "'num-supernodes' must be at least 1"),
        ({"eval-every": 0}, "'eval-every' must be at least 1"),
        ({"fraction-train": 1.5}, "'fraction-train' must be between 0 and 1"),
        ({"pool": "min"}, "'pool' must be 'max' or 'avg'"),
        ({"test-fraction": 1.0}, "'test-fraction' must be between 0 and 1"),
    ],
)
def test_bad_values_are_refused_with_a_hint(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        resolve(BACKEND, overrides)


@pytest.mark.parametrize("name", sorted(FLOWER_CLASSES))
def test_every_builtin_strategy_builds_from_the_run_config(name: str) -> None:
    config = resolve(BACKEND, {"strategy": name, "fraction-train": 0.5})
    strategy = make_strategy(config)
    assert type(strategy).__name__ == FLOWER_CLASSES[name]
    # fedplug's round loop draws the nodes; the strategy uses every node it is shown
    assert strategy.fraction_train == 1.0 and sampling(config).fraction_train == 0.5


def test_strategy_parameters_come_from_the_run_config() -> None:
    config = resolve(BACKEND, {"strategy": "fedprox", "strategy.proximal-mu": 0.3})
    assert strategy_kwargs(config)["proximal_mu"] == 0.3
    assert "proximal-mu" in strategy_parameters("fedprox")
    config = resolve(BACKEND, {"strategy": "fedadam", "strategy.eta": 1})
    assert strategy_kwargs(config)["eta"] == 1.0


def test_min_nodes_never_exceed_the_federation() -> None:
    config = resolve(BACKEND, {"num-supernodes": 1})
    assert strategy_kwargs(config)["min_available_nodes"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'; choose one of: fedavg"),
        ({"strategy": "fedavg", "strategy.proximal-mu": 0.1}, "strategy 'fedavg' has no parameter 'proximal-mu'"),
        ({"strategy": "fedprox", "strategy.proximal-mu": "high"}, "'strategy.proximal-mu' must be float"),
    ],
)
def test_bad_strategy_settings_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        strategy_kwargs(resolve(BACKEND, overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"partitioner": "random"}, "unknown partitioner 'random'; choose one of: iid, dirichlet"),
        ({"partitioner": "dirichlet", "partitioner.beta": 1.0}, "partitioner 'dirichlet' has no parameter 'beta'"),
    ],
)
def test_bad_partitioner_settings_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make_partitioner(resolve(BACKEND, overrides), 4)


@pytest.mark.parametrize("name", sorted(FLOWER_CLASSES))
def test_every_strategy_with_its_defaults_passes_the_range_checks(name: str) -> None:
    check_strategy(resolve(BACKEND, {"strategy": name}))


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fedadam", "strategy.beta-1": 0.0, "strategy.beta-2": 0.999, "strategy.tau": 1e-9},
        {"strategy.min-available-nodes": 10, "strategy.min-train-nodes": 10, "strategy.min-evaluate-nodes": 0},
        {"strategy.fraction-train": 1.0, "fraction-evaluate": 0.0},
        {"fraction-train": 0.05},  # rounds down to 0 nodes, but Flower's min-train-nodes (2) still train
        {"strategy": "fedtrimmedavg", "strategy.beta": 0.0},
        {"strategy": "fedavgm", "strategy.server-momentum": 0.0, "strategy.server-learning-rate": 0.5},
        {"strategy": "krum", "strategy.num-malicious-nodes": 3},
        {"strategy": "bulyan", "strategy.num-malicious-nodes": 1, "num-supernodes": 7},
        {"strategy": "multikrum", "strategy.num-nodes-to-select": 10},
        {"strategy": "qfedavg", "strategy.q": 0.0},
    ],
)
def test_values_at_the_edge_of_their_range_are_accepted(overrides) -> None:
    check_strategy(resolve(BACKEND, overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.fraction-train": 1.01}, "'strategy.fraction-train' must be in (0, 1]"),
        ({"strategy.min-available-nodes": 11}, "'strategy.min-available-nodes' must be between 0 and the number"),
        ({"strategy": "fedadam", "strategy.beta-2": 1.0}, "'strategy.beta-2' must be in [0, 1)"),
        ({"strategy": "bulyan", "strategy.num-malicious-nodes": 1, "num-supernodes": 6}, "4 * num-malicious-nodes"),
        ({"strategy": "krum", "strategy.num-malicious-nodes": 4}, "tolerates 4 malicious nodes"),
    ],
)
def test_out_of_range_strategy_values_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_strategy(resolve(BACKEND, overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        {"seed": 0},
        {"seed": 2**32 - 1},
        {"momentum": 0.0},
        {"momentum": 0.99},
        {"lr": 1e-6},
        {"num-supernodes": 10_000},
        {"optimizer": "adam", "weight-decay": 1e-4},
        {"weight-decay": 0},
    ],
)
def test_run_config_values_at_the_edge_are_accepted(overrides) -> None:
    resolve(BACKEND, overrides)


def test_partitioner_values_are_checked_against_the_classes() -> None:
    config = resolve(BACKEND, {"partitioner": "pathological", "partitioner.num-classes-per-partition": 10})
    check_partitioner(config, num_classes=10)
    with pytest.raises(ConfigError, match="the dataset has only 9 classes"):
        check_partitioner(config, num_classes=9)
    with pytest.raises(ConfigError, match="must be an integer of at least 1"):
        check_partitioner(resolve(BACKEND, {"partitioner": "shard", "partitioner.shard-size": 2.5}), 10)


def test_flower_app_toml_holds_any_unicode(tmp_path) -> None:
    import tomllib

    from fedplug.flower_app import write_flower_app

    config = resolve(BACKEND, {"label-column": 'étiquette 🏷️ "quoted" \\ back', "strategy.proximal-mu": 0.1})
    config["out"] = str(tmp_path / "résultats 🚀")
    app = write_flower_app(tmp_path, config)
    written = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    assert written["tool"]["flwr"]["app"]["config"] == {**config, "out": ""}  # the exported app is portable
    assert written["tool"]["flwr"]["app"]["components"]["clientapp"] == "fedplug.apps:client_app"
