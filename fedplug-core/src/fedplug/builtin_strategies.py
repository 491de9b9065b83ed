"""fedplug's built-in strategies: Flower's twelve Message-API strategies, registered like any plugin's.

It registers through the same hook as any strategy plugin (``fedplug_register_strategies``), so
fedplug-core alone has them; each descriptor names its Flower class, imported only when a run
builds it. Their checkpoint state is :data:`STATE`, declared from the installed
Flower classes (``fedplug-core/tests/test_checkpoint.py`` checks it is exactly what changes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedplug import ConfigError, Parameter, Scalar, Strategy, hookimpl
from fedplug.personal import Ditto, FedBN, FedPer

INF = None  # an unbounded end

ETA = Parameter("eta", 0.1, "server-side learning rate", 0.0, INF, low_open=True)
ETA_L = Parameter("eta-l", 0.1, "client-side learning rate (Flower keeps it for reference)", 0.0, low_open=True)
BETA_1 = Parameter("beta-1", 0.9, "first moment's decay", 0.0, 1.0, high_open=True)
BETA_2 = Parameter("beta-2", 0.99, "second moment's decay", 0.0, 1.0, high_open=True)
TAU = Parameter("tau", 0.001, "adaptivity: the second moment's floor", 0.0, low_open=True)
MALICIOUS = Parameter("num-malicious-nodes", 0, "nodes that may be malicious", 0, counts_nodes=True)
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

AVERAGING = frozenset({"dp", "secagg", "cohorts", "fold"})
"""A weighted mean of the updates: Flower's DP wrappers keep their guarantee, a sum is all it needs."""
SERVER_OPTIMISER = frozenset({"secagg", "cohorts", "fold"})
"""A server optimiser over the mean update: it needs only the sum, but DP noise on its output is not calibrated."""
ROBUST = frozenset({"cohorts", "fold"})
"""A robust rule: it reads every node's update on its own (no secure aggregation) and is not DP-calibrated."""


class Builtin(Strategy):
    """One of Flower's strategies, in ``flwr.serverapp.strategy``."""

    def __init__(self, name: str, flower: str, description: str, *params: Parameter, composes: frozenset[str]) -> None:
        self.name = name  # type: ignore[misc]
        self.description = description  # type: ignore[misc]
        self.implementation = f"flwr.serverapp.strategy:{flower}"  # type: ignore[misc]
        self.flower = flower
        self.parameters = params  # type: ignore[misc]
        self.state = STATE[name]  # type: ignore[misc]
        self.composes = composes  # type: ignore[misc]


class Krum(Builtin):
    """Krum and MultiKrum: more than ``2 * num-malicious-nodes + 2`` nodes must train."""

    def check(self, kwargs: Mapping[str, Any], trainers: int | None) -> None:
        malicious = int(kwargs.get("num_malicious_nodes", 0))
        if trainers is None:
            return
        if malicious and trainers <= 2 * malicious + 2:
            raise ConfigError(
                f"strategy '{self.name}' tolerates {malicious} malicious nodes only with more than "
                f"{2 * malicious + 2} training nodes per round, but {trainers} train: use more --nodes or fewer "
                "num-malicious-nodes"
            )
        if self.name == "multikrum" and int(kwargs.get("num_nodes_to_select", 1)) > trainers:
            raise ConfigError(
                f"strategy 'multikrum': 'strategy.num-nodes-to-select' is {kwargs['num_nodes_to_select']} but only "
                f"{trainers} nodes train per round"
            )


class Bulyan(Builtin):
    """Bulyan skips every aggregation with fewer than ``4 * num-malicious-nodes + 3`` training nodes."""

    def check(self, kwargs: Mapping[str, Any], trainers: int | None) -> None:
        malicious = int(kwargs.get("num_malicious_nodes", 0))
        if trainers is not None and trainers < 4 * malicious + 3:
            raise ConfigError(
                f"strategy 'bulyan' needs at least 4 * num-malicious-nodes + 3 = {4 * malicious + 3} training nodes "
                f"per round, but {trainers} train: use more --nodes or a higher fraction-train"
            )


class QFedAvg(Builtin):
    """q-FedAvg reads the nodes' training loss (fedplug's ``loss``) and their learning rate (the run's ``lr``)."""

    def arguments(self, kwargs: dict[str, Any], config: Mapping[str, Scalar]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        if not kwargs.get("client_learning_rate"):
            kwargs["client_learning_rate"] = float(config["lr"])
        kwargs["train_loss_key"] = "loss"
        return kwargs


BUILTINS: tuple[Strategy, ...] = (
    Builtin(
        "fedavg", "FedAvg", "Federated Averaging: the mean of the updates, weighted by examples", composes=AVERAGING
    ),
    Builtin(
        "fedprox",
        "FedProx",
        "FedAvg whose nodes add a proximal term toward the global model",
        Parameter("proximal-mu", 0.0, "weight of the proximal term on the nodes", 0.0),
        composes=AVERAGING,
    ),
    Builtin(
        "fedadam",
        "FedAdam",
        "adaptive federated optimisation with Adam on the server",
        ETA,
        ETA_L,
        BETA_1,
        BETA_2,
        TAU,
        composes=SERVER_OPTIMISER,
    ),
    Builtin(
        "fedyogi",
        "FedYogi",
        "adaptive federated optimisation with Yogi on the server",
        Parameter("eta", 0.01, ETA.help, 0.0, low_open=True),
        Parameter("eta-l", 0.0316, ETA_L.help, 0.0, low_open=True),
        BETA_1,
        BETA_2,
        TAU,
        composes=SERVER_OPTIMISER,
    ),
    Builtin(
        "fedadagrad",
        "FedAdagrad",
        "adaptive federated optimisation with Adagrad on the server",
        ETA,
        ETA_L,
        TAU,
        composes=SERVER_OPTIMISER,
    ),
    Builtin(
        "fedavgm",
        "FedAvgM",
        "FedAvg with server-side momentum",
        Parameter("server-learning-rate", 1.0, "server-side learning rate", 0.0, low_open=True),
        Parameter("server-momentum", 0.0, "server-side momentum", 0.0, 1.0, high_open=True),
        composes=SERVER_OPTIMISER,
    ),
    Builtin("fedmedian", "FedMedian", "the coordinate-wise median of the models", composes=ROBUST),
    Builtin(
        "fedtrimmedavg",
        "FedTrimmedAvg",
        "the coordinate-wise mean without the largest and smallest values",
        Parameter("beta", 0.2, "share cut at each end", 0.0, 0.5, high_open=True),
        composes=ROBUST,
    ),
    Krum("krum", "Krum", "the one model nearest to its neighbours (Byzantine-robust)", MALICIOUS, composes=ROBUST),
    Krum(
        "multikrum",
        "MultiKrum",
        "the mean of the models nearest to their neighbours (Byzantine-robust)",
        MALICIOUS,
        Parameter("num-nodes-to-select", 1, "models averaged", 1, counts_nodes=True),
        composes=ROBUST,
    ),
    Bulyan("bulyan", "Bulyan", "MultiKrum, then a trimmed mean (Byzantine-robust)", MALICIOUS, composes=ROBUST),
    QFedAvg(
        "qfedavg",
        "QFedAvg",
        "q-FedAvg: fair aggregation that weighs nodes with high loss more",
        Parameter("q", 0.1, "fairness: 0 is FedAvg, larger favours nodes with higher loss", 0.0),
        Parameter("client-learning-rate", 0.0, "the nodes' learning rate in its step; 0: the run's lr", 0.0),
        composes=ROBUST,
    ),
)
FLOWER_CLASSES = {builtin.name: builtin.flower for builtin in BUILTINS if isinstance(builtin, Builtin)}
"""Each built-in's class in ``flwr.serverapp.strategy``, by name."""
PERSONAL: tuple[Strategy, ...] = (FedPer(), Ditto(), FedBN())
"""Personalised FL (``fedplug.personal``): FedAvg on the server, a personal part on each node."""


@hookimpl
def fedplug_register_strategies(register: Any) -> None:
    for strategy in (*BUILTINS, *PERSONAL):
        register(strategy)
