"""The Flower apps: one ClientApp and one ServerApp that serve every backend.

Both take everything from the run config (``backend``, hyper-parameters, data) and the
node config (``partition-id``, ``num-partitions``), so the same objects run on the
Simulation Engine (``fedplug run``) and on the Deployment Engine, where a Flower App's
``pyproject.toml`` names ``fedplug.apps:server_app`` and ``fedplug.apps:client_app``.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedplug import dp, flower_adapter, secagg
from fedplug.backend import Backend, Config, Scalar, Weights
from fedplug.capabilities import extend_train_reply
from fedplug.data import data_spec, load_centralized
from fedplug.errors import ConfigError
from fedplug.node import backend_and_config, identity, node_data, session
from fedplug.records import from_record, to_record
from fedplug.results import Results, default_out, mark, plot_metrics, progress_log, write_status
from fedplug.rounds import NODE_RECORD, TIMING_RECORD, RoundLoop, RunFailed, resume
from fedplug.strategies import make_strategy, sampling
from fedplug.tracking import track

log = logging.getLogger("fedplug.apps")


def _failed(msg: Message, step: str, error: Exception) -> Message:
    """An error reply whose reason is the node's own one-line error; the traceback goes to the log."""
    log.error("%s failed on this node:\n%s", step, traceback.format_exc())
    reason = " ".join(str(error).split())[:240]
    return Message(
        Error(
            code=flower_adapter.client_app_raised_exception(), reason=f"{step} raised {type(error).__name__}: {reason}"
        ),
        reply_to=msg,
    )


def _client_step(msg: Message, context: Context, step: str) -> Message:
    called, started = time.time(), time.perf_counter()
    try:
        backend, config, model = session(context.run_config, context.node_config)
        partition_id, num_partitions = identity(context.node_config, context.node_id)
        part = node_data(config, context.node_config)
        content = RecordDict()
        if step == "query":
            content[NODE_RECORD] = ConfigRecord(
                {
                    "partition-id": partition_id,
                    "num-partitions": num_partitions,
                    "backend": backend.name,
                    "train-examples": len(part.y_train),
                    "test-examples": len(part.y_test),
                }
            )
            content[TIMING_RECORD] = _timing(called, started)
            return Message(content=content, reply_to=msg)
        backend.set_weights(model, from_record(cast(ArrayRecord, msg.content["arrays"])))
        sent = cast(dict[str, Scalar], dict(msg.content.get("config", ConfigRecord())))
        step_config: dict[str, Scalar] = {**config, **sent, "partition-id": partition_id}
        if step == "train":
            metrics = backend.train(model, part.x_train, part.y_train, step_config)
            content["arrays"] = to_record(backend.get_weights(model))
            # a strategy's node-side capabilities (extra reply arrays, node state): fedplug.capabilities
            extend_train_reply(content, msg.content, context.state, step_config, len(part.y_train))
        else:
            metrics = backend.evaluate(model, part.x_test, part.y_test, step_config)
        content["metrics"] = MetricRecord(dict(metrics.items()))
        content[TIMING_RECORD] = _timing(called, started)
    except Exception as error:
        return _failed(msg, step, error)
    return Message(content=content, reply_to=msg)


def _timing(called: float, started: float) -> ConfigRecord:
    """When this node's step began (wall clock) and how long its own work took: for the per-round overhead."""
    return ConfigRecord({"called": called, "seconds": time.perf_counter() - started})


client_app = ClientApp(mods=[dp.client_mod])  # differential privacy: clipping, local DP (fedplug.dp)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train on this node's partition, reply with the new weights."""
    return _client_step(msg, context, "train")


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global weights on this node's held-out split."""
    return _client_step(msg, context, "evaluate")


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id, backend and data sizes (sent once per node)."""
    return _client_step(msg, context, "query")


# -- SecAgg+ (secagg=true): the train step's four stages, fedplug.secagg ----------------------


def _secagg_step(msg: Message, context: Context, stage: str) -> Message:
    try:
        if stage == secagg.SETUP:
            settings = secagg.Settings.from_config(session(context.run_config, context.node_config)[1])
            content = secagg.client_setup(msg, context.state, context.node_id, settings)
        elif stage == secagg.SHARE:
            content = secagg.client_share(msg, context.state)
        elif stage == secagg.COLLECT:
            trained = _client_step(msg, context, "train")  # train as usual; the weights leave only masked
            if trained.has_error():
                return trained
            content = secagg.client_mask(msg, context.state, trained.content)
        else:
            content = secagg.client_unmask(msg, context.state)
    except Exception as error:
        return _failed(msg, stage, error)
    return Message(content=content, reply_to=msg)


def _secagg_handler(stage: str) -> Callable[[Message, Context], Message]:
    def handle(msg: Message, context: Context) -> Message:
        return _secagg_step(msg, context, stage)

    handle.__name__ = handle.__qualname__ = stage
    return handle


for _stage in secagg.STAGES:  # the ClientApp answers train.secagg_setup, train.secagg_share, ...
    client_app.train(_stage)(_secagg_handler(_stage))


class CentralEvaluation:
    """The server-side evaluation of the global model on the held-out set, if there is one."""

    def __init__(self, backend: Backend, config: Config, model: Any) -> None:
        self.backend, self.config, self.model = backend, config, model
        self.data = load_centralized(config) if config["centralized-eval"] else None

    def __call__(self, server_round: int, weights: Weights) -> dict[str, float] | None:
        if self.data is None:
            return None
        self.backend.set_weights(self.model, weights)
        metrics = self.backend.evaluate(self.model, *self.data, self.config)
        return {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"])}


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy from a fresh global model, or continue from the results' checkpoint."""
    backend, config = backend_and_config(context.run_config)
    model = backend.build_model(str(config["model"]), data_spec(config), config)
    out = Path(str(config["out"])) if config["out"] else default_out(backend.name)
    mark(out, "server-start")
    strategy = make_strategy(config)
    evaluation = CentralEvaluation(backend, config, model)
    try:
        with track(config, out, progress_log) as tracking:  # --track: TensorBoard, MLflow (fedplug.tracking)
            arrays = _run_rounds(grid, strategy, config, out, backend.get_weights(model), evaluation)
            mark(out, "rounds-done")
            backend.set_weights(model, from_record(arrays))
            backend.save(model, out / f"model{backend.file_suffix}")
            tracking.finished(out / f"model{backend.file_suffix}")
    except (RunFailed, ConfigError) as error:  # ConfigError: a tracker's library missing where the ServerApp runs
        write_status(out, "failed", str(error))
        raise
    plot_metrics(out, title=f"fedplug {backend.name} · {config['model']} · {config['strategy']}")
    write_status(out, "finished")


def _run_rounds(
    grid: Grid, strategy: Any, config: Config, out: Path, initial: Weights, evaluation: CentralEvaluation
) -> ArrayRecord:
    """Round 0 (the initial model) and every round after it, or the rounds after the checkpoint in ``out``."""
    resumed = resume(out, strategy)
    results = Results(out, config, None if resumed is None else resumed.rounds)
    loop = RoundLoop(grid, strategy, config, sampling(config), results, evaluation)
    last = int(config["num-server-rounds"])
    if resumed is None:
        return loop.run(to_record(initial), 0, last)
    return loop.run(
        to_record(resumed.weights),
        resumed.round + 1,
        last,
        failed_in_a_row=resumed.failed_in_a_row,
        node_states=resumed.node_states,  # the node-state capability (fedplug.capabilities)
    )
