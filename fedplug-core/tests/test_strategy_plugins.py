"""Strategies are plugins: the second hook, the built-ins through it, descriptors checked, broken ones isolated."""

from __future__ import annotations

import inspect
import json

import pytest

import fedplug
from fedplug.builtin_strategies import BUILTINS, FLOWER_CLASSES, STATE
from fedplug.config import resolve
from fedplug.errors import ConfigError
from fedplug.numpy_backend import NumpyBackend
from fedplug.plugins import build_registry as registry_with
from fedplug.strategies import check_strategy, make_strategy, state_names
from fedplug.strategy_contract import SAMPLING_PARAMETERS
from fedplug.testing.runs import cli
from fedplug.testing.runs import fedplug as fedplug_command

pytestmark = pytest.mark.fast

BACKEND = NumpyBackend()
FLOWER_OWN = {"weighted_by_key", "arrayrecord_key", "configrecord_key", "train_loss_key"}
"""Constructor parameters fedplug sets itself, never ``strategy.<param>``."""


class Scaled(fedplug.Strategy):
    """A third-party strategy: Flower's FedAvgM under another name, with a parameter of its own."""

    name = "scaled"
    description = "FedAvgM under another name"
    implementation = "flwr.serverapp.strategy:FedAvgM"
    parameters = (fedplug.Parameter("server-momentum", 0.0, "momentum", 0.0, 0.9),)
    state = ("current_arrays", "momentum_vector")
    composes = frozenset({"secagg"})


def test_the_twelve_builtins_come_through_the_strategy_hook() -> None:
    registry = registry_with()
    builtins = {
        name: entry for name, entry in registry.strategies.items() if entry.plugin == "fedplug.builtin_strategies"
    }
    assert list(builtins) == [*FLOWER_CLASSES, "fedper", "ditto", "fedbn"]  # and fedplug.personal's
    assert {(e.distribution, e.version) for e in builtins.values()} == {("fedplug-core", fedplug.__version__)}


@pytest.mark.parametrize("strategy", BUILTINS, ids=lambda s: s.name)
def test_builtin_descriptors_say_what_flowers_classes_take(strategy: fedplug.Strategy) -> None:
    """Names and defaults of the parameters are those of the Flower class (read by inspect), state is STATE's."""
    from flwr.serverapp import strategy as flower

    cls = getattr(flower, FLOWER_CLASSES[strategy.name])
    assert strategy.strategy_class() is cls
    flower_defaults = {
        key.replace("_", "-"): param.default
        for key, param in inspect.signature(cls).parameters.items()
        if key not in FLOWER_OWN
        and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        and (isinstance(param.default, bool | int | float | str) or param.default is param.empty)
    }
    declared = {param.name: param.default for param in strategy.all_parameters().values()}
    if strategy.name == "qfedavg":  # required by Flower; fedplug's 0 means the run's lr
        assert flower_defaults.pop("client-learning-rate") is inspect.Parameter.empty
        assert declared.pop("client-learning-rate") == 0.0
    assert declared == flower_defaults
    assert strategy.state == STATE[strategy.name]


def test_composition_flags_are_declared_for_dp_secagg_and_cohorts() -> None:
    dp = {s.name for s in BUILTINS if s.composes_with_dp}
    secagg = {s.name for s in BUILTINS if s.composes_with_secagg}
    assert dp == {"fedavg", "fedprox"}
    assert secagg == {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"}
    assert all(s.composes_with_cohorts for s in BUILTINS)


def test_a_plugin_strategy_is_checked_built_and_checkpointed_by_its_descriptor(monkeypatch) -> None:
    class Plugin:
        @fedplug.hookimpl
        def fedplug_register_strategies(self, register):
            register(Scaled())

    registry = registry_with(Plugin())
    assert registry.strategies["scaled"].distribution == "in-test"
    monkeypatch.setattr("fedplug.strategies.get_registry", lambda: registry)
    config = resolve(BACKEND, {"strategy": "scaled", "strategy.server-momentum": 0.5})
    check_strategy(config)
    built = make_strategy(config)
    assert type(built).__name__ == "FedAvgM" and built.server_momentum == 0.5
    assert state_names(built) == ("current_arrays", "momentum_vector")
    with pytest.raises(ConfigError, match=r"'strategy.server-momentum' must be in \[0, 0.9\], got 0.95"):
        check_strategy(resolve(BACKEND, {"strategy": "scaled", "strategy.server-momentum": 0.95}))
    with pytest.raises(ConfigError, match="strategy 'scaled' has no parameter 'eta'; it takes: fraction-evaluate"):
        check_strategy(resolve(BACKEND, {"strategy": "scaled", "strategy.eta": 0.1}))


def test_every_strategy_has_the_sampling_parameters_first() -> None:
    names = [param.name for param in SAMPLING_PARAMETERS]
    assert [param.name for param in Scaled().all_parameters().values()] == [*names, "server-momentum"]


@pytest.mark.parametrize(
    ("registered", "reason"),
    [
        (Scaled, "registered the class Scaled, not a fedplug.Strategy instance: register(Scaled())"),
        ({"name": "dict"}, "registered dict, not a fedplug.Strategy instance"),
        (
            type("Bad", (Scaled,), {"name": "bad-name"})(),
            "strategy name 'bad-name' is not a valid Python identifier",
        ),
        (type("Bad", (Scaled,), {"implementation": "FedAvg"})(), "implementation must be 'module:Class'"),
        (type("Bad", (Scaled,), {"state": None})(), "strategy 'scaled' declares no checkpoint state"),
        (type("Bad", (Scaled,), {"needs": frozenset({"telepathy"})})(), "unknown: ['telepathy']"),
        (type("Bad", (Scaled,), {"composes": frozenset({"dp2"})})(), "unknown: ['dp2']"),
        (
            type("Bad", (Scaled,), {"parameters": (fedplug.Parameter("fraction-train", 0.5),)})(),
            "is a sampling parameter fedplug applies itself",
        ),
        (
            type("Bad", (Scaled,), {"parameters": (fedplug.Parameter("mu", -1.0, low=0.0),)})(),
            "parameter 'mu' default must be in [0, inf), got -1.0",
        ),
        (type("Bad", (Scaled,), {"name": "fedavg"})(), "strategy 'fedavg' is already registered by plugin"),
    ],
)
def test_malformed_registrations_are_reported_and_the_rest_keep_working(registered: object, reason: str) -> None:
    class Plugin:
        @fedplug.hookimpl
        def fedplug_register_strategies(self, register):
            register(registered)
            register(type("Fine", (Scaled,), {"name": "fine"})())

    registry = registry_with(Plugin())
    reasons = [b.reason for b in registry.broken if b.plugin == "in-test-0"]
    assert len(reasons) == 1 and reason in reasons[0]
    assert "fine" in registry.strategies and "fedavg" in registry.strategies
    assert registry.strategies["fedavg"].plugin == "fedplug.builtin_strategies"


def test_a_strategy_hook_that_raises_leaves_the_backends_and_other_strategies() -> None:
    class Plugin:
        @fedplug.hookimpl
        def fedplug_register_backends(self, register):
            register(type("Renamed", (NumpyBackend,), {"name": "renamed"})())

        @fedplug.hookimpl
        def fedplug_register_strategies(self, register):
            raise SystemExit(3)

    registry = registry_with(Plugin())
    assert [b.reason for b in registry.broken if b.plugin == "in-test-0"] == [
        "SystemExit: the plugin called sys.exit(3)"
    ]
    assert "renamed" in registry.backends and len(registry.strategies) >= 12


def test_installed_broken_strategy_plugins_cannot_break_list() -> None:
    env = {"FEDPLUG_PLUGINS": "strategies,strategyraises", "COLUMNS": "250"}
    done = fedplug_command("list", "--strategies", "--json", env=env)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    ok = {row["name"]: row for row in rows if row["status"] == "ok"}
    assert ok["example_mean"]["distribution"] == "fedplug-testplugins" and "fedavg" in ok
    broken = sorted((row["name"], row["reason"]) for row in rows if row["status"] == "broken")
    assert [name for name, _ in broken] == ["strategies", "strategies", "strategyraises"]
    assert "strategy 'no_state' declares no checkpoint state" in broken[0][1] + broken[1][1]
    assert "RuntimeError: this strategy plugin fails in its hook" in broken[2][1]
    assert "fedplug: plugin 'strategyraises' (fedplug-testplugins) is broken" in done.stderr
    table = fedplug_command("list", env=env)
    assert table.returncode == 0 and "example_mean" in table.stdout and "fedplug strategies" in table.stdout


def test_list_json_keeps_backend_rows_and_info_shows_a_strategy() -> None:
    done = cli("list", "--json", env={"FEDPLUG_PLUGINS": ""})
    assert [row["name"] for row in json.loads(done.stdout)] == ["numpy"]
    info = cli("info", "fedtrimmedavg", env={"FEDPLUG_PLUGINS": "", "COLUMNS": "200"})
    assert info.returncode == 0
    assert "fedtrimmedavg (strategy)" in info.stdout and "fedplug-core" in info.stdout
    assert "beta" in info.stdout and "[0, 0.5)" in info.stdout and "dp no, secagg no, cohorts yes" in info.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--strategy", "fedadm"), "unknown strategy 'fedadm'; choose one of: fedavg"),
        (("--strategy", "fedadam", "--run-config", "strategy.tau=0"), "'strategy.tau' must be in (0, inf), got 0.0"),
        (("--strategy", "fedavg", "--run-config", "strategy.eta=0.1"), "strategy 'fedavg' has no parameter 'eta'"),
    ],
)
def test_run_refuses_a_strategy_or_parameter_the_descriptor_does_not_allow(args: tuple[str, ...], message: str) -> None:
    done = cli("run", "numpy", *args, env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
