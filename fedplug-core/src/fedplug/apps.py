"""The Flower apps: one ClientApp and one ServerApp that serve every backend.

Both take everything from the run config (``backend``, hyper-parameters, data) and the
node config (``partition-id``, ``num-partitions``), so the same objects run on the
Simulation Engine (``fedplug run``) and on the Deployment Engine, where a Flower App's
``pyproject.toml`` names ``fedplug.apps:server_app`` and ``fedplug.apps:client_app``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedplug.backend import Backend, Config, Scalar, Weights
from fedplug.config import resolve
from fedplug.data import data_spec, load_centralized, load_partition
from fedplug.plugins import get_backend
from fedplug.results import Results, default_out, plot_metrics
from fedplug.strategies import make_strategy


def to_record(weights: Weights) -> ArrayRecord:
    """Canonical weights -> ArrayRecord, keeping names and order."""
    return ArrayRecord(OrderedDict((name, Array(array)) for name, array in weights.items()))


def from_record(record: ArrayRecord) -> Weights:
    return {name: array.numpy() for name, array in record.items()}


def backend_and_config(run_config: Config) -> tuple[Backend, dict[str, Scalar]]:
    """The backend named by the run config and the config completed with its defaults."""
    backend = get_backend(str(run_config.get("backend", "numpy")))
    backend.check_available()
    return backend, resolve(backend, run_config)


@cache
def _session(run_config: tuple[tuple[str, Scalar], ...]) -> tuple[Backend, dict[str, Scalar], Any]:
    """Backend, config and model of this process: built once, reused every round."""
    backend, config = backend_and_config(dict(run_config))
    model = backend.build_model(str(config["model"]), data_spec(config), config)
    return backend, config, model


def _client_step(msg: Message, context: Context, train: bool) -> Message:
    backend, config, model = _session(tuple(sorted(context.run_config.items())))
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    part = load_partition(config, partition_id, num_partitions)
    backend.set_weights(model, from_record(msg.content["arrays"]))
    step_config = {**config, **dict(msg.content.get("config", ConfigRecord())), "partition-id": partition_id}
    content = RecordDict()
    if train:
        metrics = backend.train(model, part.x_train, part.y_train, step_config)
        content["arrays"] = to_record(backend.get_weights(model))
    else:
        metrics = backend.evaluate(model, part.x_test, part.y_test, step_config)
    content["metrics"] = MetricRecord({key: value for key, value in metrics.items()})
    return Message(content=content, reply_to=msg)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train on this node's partition, reply with the new weights."""
    return _client_step(msg, context, train=True)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on this node's held-out split."""
    return _client_step(msg, context, train=False)


class RoundTracker:
    """Collects each round's aggregated metrics and writes them when the round ends."""

    def __init__(self, backend: Backend, config: Config, model: Any, results: Results) -> None:
        self.backend, self.config, self.model, self.results = backend, config, model, results
        self.central = load_centralized(config) if config["centralized-eval"] else None
        self.current: dict[str, Any] = {}
        self.started = time.monotonic()

    def aggregator(self, kind: str) -> Any:
        def aggregate(records: list[RecordDict], weighting_key: str) -> MetricRecord:
            metrics = aggregate_metricrecords(records, weighting_key)
            self.current[f"{kind}-nodes"] = len(records)
            for name in ("loss", "accuracy"):
                if name in metrics:
                    self.current[f"{kind}-{name}"] = float(metrics[name])  # type: ignore[arg-type]
            return metrics

        return aggregate

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower calls this (as ``evaluate_fn``) before round 1 and after every round."""
        if server_round > 0 and "train-nodes" not in self.current:
            raise RuntimeError(
                f"no node returned a training result in round {server_round}: the ClientApps failed "
                "(run with --verbose to see their errors)"
            )
        weights = from_record(arrays)
        record: dict[str, Any] = {"round": server_round, **self.current}
        central = None
        if self.central is not None:
            self.backend.set_weights(self.model, weights)
            metrics = self.backend.evaluate(self.model, *self.central, self.config)
            record["centralized-loss"] = float(metrics["loss"])
            record["centralized-accuracy"] = float(metrics["accuracy"])
            central = MetricRecord({"loss": record["centralized-loss"], "accuracy": record["centralized-accuracy"]})
        record["seconds"] = round(time.monotonic() - self.started, 3)
        self.results.save_weights(weights)
        self.results.add_round(record)
        self.current, self.started = {}, time.monotonic()
        return central


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy from a freshly built global model; save what it learned."""
    backend, config = backend_and_config(context.run_config)
    model = backend.build_model(str(config["model"]), data_spec(config), config)
    out = Path(str(config["out"])) if config["out"] else default_out(backend.name)
    results = Results(out, config)
    tracker = RoundTracker(backend, config, model, results)
    strategy = make_strategy(config, tracker.aggregator("train"), tracker.aggregator("evaluate"))
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(backend.get_weights(model)),
        num_rounds=int(config["num-server-rounds"]),  # type: ignore[arg-type]
        train_config=ConfigRecord({"lr": config["lr"]}),
        evaluate_fn=tracker.end_round,
    )
    backend.set_weights(model, from_record(result.arrays))
    backend.save(model, out / f"model{backend.file_suffix}")
    plot_metrics(out, title=f"fedplug {backend.name} · {config['model']} · {config['strategy']}")
