"""Flower's built-in strategies by name, with their parameters taken from the run config."""

from __future__ import annotations

import inspect
from typing import Any

from fedplug.backend import Config, Scalar
from fedplug.config import ConfigError, coerce

STRATEGIES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedavgm": "FedAvgM",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
    "multikrum": "MultiKrum",
    "bulyan": "Bulyan",
    "qfedavg": "QFedAvg",
}
INTERNAL = {
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
    "selection_rule",
    "train_loss_key",
    "self",
}
"""Constructor parameters fedplug sets itself; everything else is ``strategy.<param>``."""


def strategy_class(name: str) -> type:
    from flwr.serverapp import strategy

    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}")
    return getattr(strategy, STRATEGIES[name])  # type: ignore[no-any-return]


def strategy_parameters(name: str) -> dict[str, Scalar]:
    """``kebab-name -> default`` of the parameters a user may set for strategy ``name``."""
    signature = inspect.signature(strategy_class(name).__init__)
    return {
        key.replace("_", "-"): param.default
        for key, param in signature.parameters.items()
        if key not in INTERNAL
        and param.kind is not param.VAR_KEYWORD
        and isinstance(param.default, bool | int | float | str)
    }


def strategy_kwargs(config: Config) -> dict[str, Any]:
    """Constructor arguments of the configured strategy, checked by name and type."""
    name = str(config["strategy"])
    known = strategy_parameters(name)
    nodes = int(config["num-supernodes"])  # type: ignore[arg-type]
    values: dict[str, Scalar] = {
        "fraction-train": config["fraction-train"],
        "fraction-evaluate": config["fraction-evaluate"],
        # Flower waits for 2 nodes by default: never wait for more nodes than the run has
        "min-train-nodes": min(2, nodes),
        "min-evaluate-nodes": min(2, nodes),
        "min-available-nodes": min(2, nodes),
    }
    for key, value in config.items():
        if key.startswith("strategy."):
            param = key.removeprefix("strategy.")
            if param not in known and not (name == "qfedavg" and param == "client-learning-rate"):
                raise ConfigError(f"strategy '{name}' has no parameter '{param}'; it takes: {', '.join(sorted(known))}")
            values[param] = coerce(key, value, known.get(param, 0.0))
    kwargs = {key.replace("-", "_"): value for key, value in values.items()}
    if name == "qfedavg":
        kwargs.setdefault("client_learning_rate", float(config["lr"]))  # type: ignore[arg-type]
        kwargs["train_loss_key"] = "loss"
    return kwargs


SAMPLING = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")
"""Parameters fedplug's round loop applies itself (``fedplug.rounds``): the strategy sees only drawn nodes."""


def sampling(config: Config) -> Any:
    """How many nodes the configured strategy wants per round (fractions and minimums)."""
    from fedplug.rounds import Sampling

    kwargs = strategy_kwargs(config)
    return Sampling(**{name: kwargs[name] for name in SAMPLING})


def make_strategy(config: Config) -> Any:
    """The configured strategy, set to use every node the round loop shows it."""
    cls = strategy_class(str(config["strategy"]))
    kwargs = strategy_kwargs(config)
    kwargs.update(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0, min_evaluate_nodes=0)
    kwargs["min_available_nodes"] = 0
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"strategy '{config['strategy']}': {error}") from error
