"""The strategies of this environment by name: their descriptors, parameters, checks and state.

Strategies are plugins (``fedplug.strategy_contract``): every installed plugin registers
descriptors through the ``fedplug_register_strategies`` hook, Flower's twelve built-ins
included (``fedplug.builtin_strategies``). Here the run config's ``strategy`` and
``strategy.<param>`` values are checked against the descriptor, and the strategy is built.

The strategy samples nothing (the invariant is stated and kept in ``fedplug.rounds``):
``make_strategy`` builds every strategy to take all the nodes the round loop shows it
(fractions 1, minimums 0), and the run config's fractions and minimums become the
``Sampling`` that the loop applies (``sampling``).

**A strategy's state is declared.** Its descriptor names the attributes that change from one
round to the next (``Strategy.state``; for Flower's twelve built-ins, ``fedplug.builtin_strategies.STATE``,
read from the installed Flower classes). A checkpoint
(``fedplug.checkpoint``) saves and restores exactly those, by name, and refuses a strategy
that declares none rather than save part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedplug import dp
from fedplug.backend import Config, Scalar
from fedplug.config import coerce
from fedplug.errors import ConfigError
from fedplug.plugins import UnknownStrategy, get_registry
from fedplug.strategy_contract import Strategy


def descriptor(name: str) -> Strategy:
    """The installed strategy ``name``; ConfigError (with the choices, or its broken plugin) if there is none."""
    try:
        return get_registry().get_strategy(name)
    except UnknownStrategy as error:
        raise ConfigError(str(error)) from error


def strategy_class(name: str) -> type:
    """The class strategy ``name`` builds (imported now)."""
    return descriptor(name).strategy_class()


def state_names(strategy: object) -> tuple[str, ...]:
    """The attributes of ``strategy`` that a checkpoint must keep; refuses a strategy no descriptor declares."""
    wrapped = getattr(strategy, "checkpoint_state", None)  # a wrapper (fedplug.dp.DpStrategy) declares its own
    if wrapped is not None:
        return tuple(wrapped)
    for entry in get_registry().strategies.values():
        declared = entry.strategy
        if declared.implementation.rpartition(":")[2] != type(strategy).__name__ or declared.state is None:
            continue  # by name first: importing every installed strategy's class is not needed
        try:
            cls = declared.strategy_class()
        except ConfigError:
            continue
        if type(strategy) is cls:  # a subclass may hold state of its own: not declared
            return declared.state
    raise TypeError(
        f"strategy {type(strategy).__module__}.{type(strategy).__qualname__} declares no checkpoint state "
        "(fedplug.Strategy.state): it cannot be checkpointed, and saving part of it would resume another run"
    )


def strategy_parameters(name: str) -> dict[str, Scalar]:
    """``kebab-name -> default`` of the parameters a user may set for strategy ``name``."""
    return {key: param.default for key, param in descriptor(name).all_parameters().items()}


def strategy_kwargs(config: Config) -> dict[str, Any]:
    """Constructor arguments of the configured strategy's parameters, checked by name and type."""
    name = str(config["strategy"])
    known = strategy_parameters(name)
    nodes = int(config["num-supernodes"])
    values: dict[str, Scalar] = dict(known)
    values.update(
        {
            "fraction-train": config["fraction-train"],
            "fraction-evaluate": config["fraction-evaluate"],
            # Flower waits for 2 nodes by default: never wait for more nodes than the run has
            "min-train-nodes": min(2, nodes),
            "min-evaluate-nodes": min(2, nodes),
            "min-available-nodes": min(2, nodes),
        }
    )
    for key, value in config.items():
        if key.startswith("strategy."):
            param = key.removeprefix("strategy.")
            if param not in known:
                raise ConfigError(f"strategy '{name}' has no parameter '{param}'; it takes: {', '.join(sorted(known))}")
            values[param] = coerce(key, value, known[param])
    return {key.replace("-", "_"): value for key, value in values.items()}


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


def check_strategy(config: Config, nodes_known: bool = True) -> None:
    """Check the strategy's parameters against their valid ranges and the node count.

    Flower's classes accept out-of-range values; a run would then wait for nodes that never
    come (``min-*-nodes`` above the node count, ``fraction-train`` above 1), diverge
    (``beta-1`` of 1, ``tau`` of 0) or skip every aggregation (Bulyan with too few nodes):
    all of that is refused here, before Ray starts. ``nodes_known=False`` (a run on a SuperLink,
    whose nodes join when they will): the ranges only, not the checks against the node count.
    """
    name = str(config["strategy"])
    strategy = descriptor(name)
    kwargs = strategy_kwargs(config)
    nodes = int(config["num-supernodes"])
    if (check_run := getattr(strategy, "check_run", None)) is not None:  # the run's model (fedplug.personal.FedBN)
        check_run(config)
    if config.get("secagg") and not strategy.composes_with_secagg:  # its declared composition (fedplug.Strategy)
        able = sorted(key for key, entry in get_registry().strategies.items() if entry.strategy.composes_with_secagg)
        raise ConfigError(
            f"strategy '{name}' needs every node's update, which secagg hides from the server: "
            f"choose one of {', '.join(able)}, or drop secagg"
        )
    if dp.central(config) and not strategy.composes_with_dp:  # its declared composition (fedplug.Strategy)
        able = sorted(key for key, entry in get_registry().strategies.items() if entry.strategy.composes_with_dp)
        raise ConfigError(
            f"dp={config['dp']} calibrates its noise to the mean of clipped updates, but strategy '{name}' "
            f"aggregates otherwise (its sensitivity is not bounded by the clipping norm): use {' or '.join(able)}, "
            "or dp=local"
        )

    def shown(param: str) -> str:
        kebab = param.replace("_", "-")
        return f"'strategy.{kebab}'" if f"strategy.{kebab}" in config or kebab not in config else f"'{kebab}'"

    for param in strategy.all_parameters().values():
        value = kwargs[param.argument]
        problem = param.problem(value)
        if param.counts_nodes and not isinstance(value, bool) and isinstance(value, int | float):
            low = 0 if param.low is None else int(param.low)
            if value < low or (nodes_known and value > nodes):
                problem = (
                    f"must be between {low} and the number of nodes ({nodes}), got {value}; "
                    "the run would wait for nodes that never come"
                )
        if problem:
            raise ConfigError(f"strategy '{name}': {shown(param.argument)} {problem}")
    if not nodes_known:
        strategy.check(kwargs, None)
        return
    sampled = max(int(nodes * float(kwargs["fraction_train"])), int(kwargs["min_train_nodes"]))
    if sampled < 1:
        raise ConfigError(
            f"with {nodes} nodes and fraction-train {kwargs['fraction_train']} no node trains: "
            "raise fraction-train or set strategy.min-train-nodes=1"
        )
    strategy.check(kwargs, sampled)


def use_cohorts(config: Config) -> bool:
    """Whether a simulation serves its clients in cohorts (``fedplug.rounds.Cohorts``; the result is the same).

    ``cohorts=true`` (the default) asks for it; a run whose clients must each be a node of their own
    gets one SuperNode per client instead: SecAgg+ (each client's keys and masked messages), DP on the
    clients (Flower's mods act on one client's reply), a strategy that asks nodes for capabilities
    (node state lives in one node's ``Context.state``), or one that does not declare it composes with
    cohorts.
    """
    if not config.get("cohorts", True) or config.get("secagg") or dp.client_side(config):
        return False
    strategy = descriptor(str(config["strategy"]))
    return strategy.composes_with_cohorts and not strategy.needs


def fold_evaluation(config: Config) -> bool:
    """Whether a round's federated evaluation travels with the next round's training (``fedplug.folding``).

    ``fold-evaluation=true`` (the default) asks for it; not with SecAgg+ (its training is four exchanges
    of its own) or DP on the clients (Flower's mods act on a training reply alone), nor for a strategy
    that does not declare ``"fold"`` (its ``configure_train`` may depend on the previous evaluation).
    """
    if not config.get("fold-evaluation", True) or config.get("secagg") or dp.client_side(config):
        return False
    return descriptor(str(config["strategy"])).composes_with_fold


def make_strategy(config: Config) -> Any:
    """The configured strategy, set to use every node the round loop shows it (it samples nothing)."""
    strategy = descriptor(str(config["strategy"]))
    kwargs = strategy.arguments(strategy_kwargs(config), config)
    kwargs.update(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=0, min_evaluate_nodes=0)
    kwargs["min_available_nodes"] = 0
    return dp.wrap(strategy.build(kwargs), config)  # central differential privacy (dp=...): Flower's DP wrapper
