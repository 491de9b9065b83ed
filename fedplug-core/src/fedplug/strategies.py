"""Flower's built-in strategies by name, with their parameters taken from the run config.

The strategy samples nothing (the invariant is stated and kept in ``fedplug.rounds``):
``make_strategy`` builds every strategy to take all the nodes the round loop shows it
(fractions 1, minimums 0), and the run config's fractions and minimums become the
``Sampling`` that the loop applies (``sampling``).

**A strategy's state is declared.** ``STATE`` names, for each of the twelve strategies,
the attributes that change from one round to the next (read from the installed Flower
classes); a checkpoint (``fedplug.checkpoint``) saves and restores exactly those, by name,
and refuses a strategy that declares none rather than save part of it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from fedplug import dp
from fedplug.backend import Config, Scalar
from fedplug.config import coerce
from fedplug.errors import ConfigError

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
STATE: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": (),
    # FedOpt: the global model of the round (set by configure_train) and the first moment;
    # FedAdam, FedYogi, FedAdagrad: the second moment too
    "fedadam": ("current_arrays", "m_t", "v_t"),
    "fedyogi": ("current_arrays", "m_t", "v_t"),
    "fedadagrad": ("current_arrays", "m_t", "v_t"),
    # the server's model (set once, then by aggregate_train) and the momentum
    "fedavgm": ("current_arrays", "momentum_vector"),
    "fedmedian": (),
    "fedtrimmedavg": (),
    "krum": (),
    "multikrum": (),
    "bulyan": (),
    "qfedavg": ("current_arrays",),  # the global model of the round (set by configure_train)
}
"""Each strategy's attributes that change across rounds: what a checkpoint saves, by name."""
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

INF = math.inf
RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "fraction_train": (0.0, False, 1.0, True),
    "fraction_evaluate": (0.0, True, 1.0, True),
    "proximal_mu": (0.0, True, INF, False),
    "eta": (0.0, False, INF, False),
    "eta_l": (0.0, False, INF, False),
    "tau": (0.0, False, INF, False),
    "beta_1": (0.0, True, 1.0, False),
    "beta_2": (0.0, True, 1.0, False),
    "beta": (0.0, True, 0.5, False),
    "server_learning_rate": (0.0, False, INF, False),
    "server_momentum": (0.0, True, 1.0, False),
    "q": (0.0, True, INF, False),
    "client_learning_rate": (0.0, False, INF, False),
}
"""Valid ``(low, low included, high, high included)`` of the strategies' numeric parameters."""
NODE_COUNTS = {
    "min_train_nodes": 0,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 0,
    "num_malicious_nodes": 0,
    "num_nodes_to_select": 1,
}
"""Parameters that count nodes, with their smallest valid value; none may exceed the node count."""


def strategy_class(name: str) -> type:
    from flwr.serverapp import strategy

    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}")
    return getattr(strategy, STRATEGIES[name])  # type: ignore[no-any-return]


def state_names(strategy: object) -> tuple[str, ...]:
    """The attributes of ``strategy`` that a checkpoint must keep; refuses a strategy not in ``STATE``."""
    declared = getattr(strategy, "checkpoint_state", None)  # a wrapper (fedplug.dp.DpStrategy) declares its own
    if declared is not None:
        return tuple(declared)
    for name in STRATEGIES:
        if type(strategy) is strategy_class(name):  # a subclass may hold state of its own: not declared
            return STATE[name]
    raise TypeError(
        f"strategy {type(strategy).__module__}.{type(strategy).__qualname__} declares no checkpoint state "
        "(fedplug.strategies.STATE): it cannot be checkpointed, and saving part of it would resume another run"
    )


def strategy_parameters(name: str) -> dict[str, Scalar]:
    """``kebab-name -> default`` of the parameters a user may set for strategy ``name``."""
    signature = inspect.signature(strategy_class(name))
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
    nodes = int(config["num-supernodes"])
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
        kwargs.setdefault("client_learning_rate", float(config["lr"]))
        kwargs["train_loss_key"] = "loss"
    return kwargs


@dataclass(frozen=True)
class Sampling:
    """How many nodes take part in a round: Flower's fractions and minimums, applied by the round loop."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int


SAMPLING = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")
"""Parameters fedplug's round loop applies itself (``fedplug.rounds``): the strategy sees only drawn nodes."""


def sampling(config: Config) -> Sampling:
    """How many nodes the configured strategy wants per round (fractions and minimums)."""
    kwargs = strategy_kwargs(config)
    return Sampling(**{name: kwargs[name] for name in SAMPLING})


def _interval(low: float, low_in: bool, high: float, high_in: bool) -> str:
    return f"{'[' if low_in else '('}{low:g}, {'inf' if high == INF else f'{high:g}'}{']' if high_in else ')'}"


def check_strategy(config: Config, nodes_known: bool = True) -> None:
    """Check the strategy's parameters against their valid ranges and the node count.

    Flower's classes accept out-of-range values; a run would then wait for nodes that never
    come (``min-*-nodes`` above the node count, ``fraction-train`` above 1), diverge
    (``beta-1`` of 1, ``tau`` of 0) or skip every aggregation (Bulyan with too few nodes):
    all of that is refused here, before Ray starts. ``nodes_known=False`` (a run on a SuperLink,
    whose nodes join when they will): the ranges only, not the checks against the node count.
    """
    name = str(config["strategy"])
    kwargs = strategy_kwargs(config)
    nodes = int(config["num-supernodes"])

    def shown(param: str) -> str:
        kebab = param.replace("_", "-")
        return f"'strategy.{kebab}'" if f"strategy.{kebab}" in config or kebab not in config else f"'{kebab}'"

    for param, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            raise ConfigError(f"strategy '{name}': {shown(param)} must be a finite number, got {value}")
        if param in RANGES:
            low, low_in, high, high_in = RANGES[param]
            inside = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
            if not inside:
                raise ConfigError(
                    f"strategy '{name}': {shown(param)} must be in {_interval(*RANGES[param])}, got {value}"
                )
        if param in NODE_COUNTS and not NODE_COUNTS[param] <= value <= (nodes if nodes_known else math.inf):
            raise ConfigError(
                f"strategy '{name}': {shown(param)} must be between {NODE_COUNTS[param]} and the number of nodes "
                f"({nodes}), got {value}; the run would wait for nodes that never come"
            )
    if not nodes_known:
        return
    sampled = max(int(nodes * float(kwargs["fraction_train"])), int(kwargs["min_train_nodes"]))
    if sampled < 1:
        raise ConfigError(
            f"with {nodes} nodes and fraction-train {kwargs['fraction_train']} no node trains: "
            "raise fraction-train or set strategy.min-train-nodes=1"
        )
    malicious = int(kwargs.get("num_malicious_nodes", 0))
    if name == "bulyan" and sampled < 4 * malicious + 3:
        raise ConfigError(
            f"strategy 'bulyan' needs at least 4 * num-malicious-nodes + 3 = {4 * malicious + 3} training nodes "
            f"per round, but {sampled} train: use more --nodes or a higher fraction-train"
        )
    if name in ("krum", "multikrum") and malicious and sampled <= 2 * malicious + 2:
        raise ConfigError(
            f"strategy '{name}' tolerates {malicious} malicious nodes only with more than {2 * malicious + 2} "
            f"training nodes per round, but {sampled} train: use more --nodes or fewer num-malicious-nodes"
        )
    if name == "multikrum" and int(kwargs.get("num_nodes_to_select", 1)) > sampled:
        raise ConfigError(
            f"strategy 'multikrum': 'strategy.num-nodes-to-select' is {kwargs['num_nodes_to_select']} but only "
            f"{sampled} nodes train per round"
        )


def make_strategy(config: Config) -> Any:
    """The configured strategy, set to use every node the round loop shows it (it samples nothing)."""
    cls = strategy_class(str(config["strategy"]))
    kwargs = strategy_kwargs(config)
    kwargs.update(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0, min_evaluate_nodes=0)
    kwargs["min_available_nodes"] = 0
    try:
        made = cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"strategy '{config['strategy']}': {error}") from error
    return dp.wrap(made, config)  # central differential privacy (dp=...): Flower's DP wrapper around it
