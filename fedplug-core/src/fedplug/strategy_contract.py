"""What a strategy is: a light descriptor, and an implementation imported on first use.

A strategy plugin registers ``Strategy`` descriptors through the ``fedplug_register_strategies``
hook, exactly as a backend plugin registers ``Backend`` descriptors. The descriptor holds what
``fedplug list``, ``fedplug info`` and the run checks read: the name, a one-line description,
the parameters (``strategy.<param>=...``) with their types, defaults and valid ranges, the node
capabilities it needs, the attributes a checkpoint must keep and whether it composes with
differential privacy, secure aggregation and cohorts. Its ``implementation`` names, as
``"module:Class"``, a Flower Message-API strategy class (or a class of the plugin that drives
one); that module is imported only when a run builds the strategy.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from fedplug.errors import ConfigError
from fedplug.types import Scalar

__all__ = ["CAPABILITIES", "COMPOSES", "SAMPLING_PARAMETERS", "Parameter", "Strategy"]

CAPABILITIES = {
    "reply-arrays": "the node's train reply carries extra ArrayRecords the strategy asks for (e.g. control variates)",
    "node-state": "the node keeps arrays of its own from one round to the next, saved in simulation checkpoints",
}
"""The node-side capabilities a strategy may need (``Strategy.needs``), each implemented once in the core."""
COMPOSES = ("dp", "secagg", "cohorts", "fold")
"""What a strategy declares it composes with: differential privacy, secure aggregation, cohorts of clients, a
round's evaluation folded into the next round's training exchange."""


@dataclass(frozen=True)
class Parameter:
    """One parameter of a strategy, set with ``strategy.<name>=value``: its type is its default's.

    ``low``/``high`` bound a number (``None``: unbounded), each end included unless ``low_open``
    / ``high_open``; ``counts_nodes`` marks a number of nodes, which may not exceed the run's.
    ``help`` is one line for ``fedplug info``. ``name`` is kebab-case; the implementation's
    constructor receives it in snake_case (``proximal-mu`` -> ``proximal_mu``).
    """

    name: str
    default: Scalar
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    counts_nodes: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def argument(self) -> str:
        """The constructor argument's name."""
        return self.name.replace("-", "_")

    def range_text(self) -> str:
        """``[0, 1)``, ``(0, inf)``, or ``""`` for an unbounded parameter."""
        if self.low is None and self.high is None:
            return ""
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        closed_low = self.low is not None and not self.low_open
        closed_high = self.high is not None and not self.high_open
        return f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"

    def problem(self, value: Scalar) -> str | None:
        """Why ``value`` is outside this parameter's range, or None."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be in {self.range_text()}, got {value}" if below or above else None


SAMPLING_PARAMETERS = (
    Parameter("fraction-train", 1.0, "share of the nodes drawn to train each round", 0.0, 1.0, low_open=True),
    Parameter("fraction-evaluate", 1.0, "share of the nodes drawn to evaluate each round", 0.0, 1.0),
    Parameter("min-train-nodes", 2, "fewest nodes drawn to train", 0, counts_nodes=True),
    Parameter("min-evaluate-nodes", 2, "fewest nodes drawn to evaluate", 0, counts_nodes=True),
    Parameter("min-available-nodes", 2, "nodes to wait for before a round", 0, counts_nodes=True),
)
"""Every strategy's sampling parameters: fedplug's round loop applies them, the strategy sees the drawn nodes."""


class Strategy:
    """A strategy's descriptor: class attributes only, and no import of Flower or a framework.

    Subclass it in the plugin module and register an instance with the
    ``fedplug_register_strategies`` hook. ``implementation`` names the class a run builds with
    the strategy's parameters as keyword arguments (snake_case), plus Flower's five sampling
    arguments set to take every node the round loop shows it (``fraction_train=1.0``,
    ``fraction_evaluate=1.0``, ``min_train_nodes=0``, ``min_evaluate_nodes=0``,
    ``min_available_nodes=0``): subclassing ``flwr.serverapp.strategy.FedAvg`` gives them.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    implementation: ClassVar[str] = ""
    """``"module:Class"`` of the strategy class, imported when a run builds it."""
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    """The strategy's own parameters (the sampling parameters every strategy has are added by fedplug)."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """Node capabilities it needs (``CAPABILITIES``), served by the core for every backend (``fedplug.capabilities``)
    through its ``node_step``; a registration that needs one without a ``node_step`` is refused."""
    state: ClassVar[tuple[str, ...] | None] = None
    """The attributes of the built strategy that change from round to round: what a checkpoint saves and
    restores, by name. ``()`` for a stateless strategy; ``None`` (undeclared) is refused at registration."""
    reply_records: ClassVar[tuple[str, ...]] = ()
    """Names of the extra ArrayRecords a node's train reply carries (``"reply-arrays"``), e.g. ``("control",)``:
    the round loop screens them (finite numbers) and passes them to ``aggregate_train`` with the weights."""
    node_step: ClassVar[str] = ""
    """``"module:function"`` run on the node after the backend's ``train`` when the strategy ``needs`` a
    capability: ``function(step: fedplug.NodeStep)`` reads and changes ``step.after``, ``step.state`` and
    ``step.reply`` (``fedplug.capabilities``). Imported on the node, on first use."""
    composes: ClassVar[frozenset[str]] = frozenset()
    """Which of ``COMPOSES`` it works with: ``"dp"`` (Flower's DP wrappers around it keep their guarantee:
    it aggregates by a weighted mean of the clipped updates), ``"secagg"`` (it needs only the sum of the
    replies, never one node's), ``"cohorts"`` (it accepts replies of clients served by a shared node), ``"fold"``
    (its ``configure_train`` does not depend on the previous round's ``aggregate_evaluate``, and
    ``configure_evaluate`` sends the model it trains from: ``fedplug.folding`` may send them in one exchange)."""

    @property
    def composes_with_dp(self) -> bool:
        return "dp" in self.composes

    @property
    def composes_with_secagg(self) -> bool:
        return "secagg" in self.composes

    @property
    def composes_with_cohorts(self) -> bool:
        return "cohorts" in self.composes

    @property
    def composes_with_fold(self) -> bool:
        return "fold" in self.composes

    def all_parameters(self) -> dict[str, Parameter]:
        """The sampling parameters, then the strategy's own, by name."""
        found = {param.name: param for param in SAMPLING_PARAMETERS}
        found.update({param.name: param for param in self.parameters})
        return found

    def check(self, kwargs: Mapping[str, Any], trainers: int | None) -> None:
        """Checks across parameters, after each parameter's own range: raise ``ConfigError`` in one line.

        ``kwargs`` are the constructor arguments (snake_case); ``trainers`` is how many nodes train
        per round, or None when the nodes are not known before the run (a deployment). Default: none.
        """

    def arguments(self, kwargs: dict[str, Any], config: Mapping[str, Scalar]) -> dict[str, Any]:
        """The constructor arguments from the checked parameters and the run config. Default: ``kwargs``."""
        return kwargs

    def strategy_class(self) -> type:
        """The implementation's class, imported now."""
        module, _, name = self.implementation.partition(":")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as error:
            raise ConfigError(
                f"strategy '{self.name}': its implementation {self.implementation!r} cannot be imported "
                f"({type(error).__name__}: {error}); reinstall its plugin"
            ) from error
        if not isinstance(found, type):
            raise ConfigError(f"strategy '{self.name}': {self.implementation!r} is not a class")
        return found

    def build(self, kwargs: Mapping[str, Any]) -> Any:
        """A new strategy object for one run."""
        try:
            return self.strategy_class()(**kwargs)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"strategy '{self.name}': {error}") from error
