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
from functools import partial
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedplug import dp, flower_adapter, folding, secagg
from fedplug.backend import Backend, Config, Scalar, Weights
from fedplug.capabilities import extend_train_reply, personal_weights, train_start
from fedplug.data import data_spec, load_centralized, partition_sizes
from fedplug.errors import ConfigError
from fedplug.node import backend_and_config, identity, node_data, session
from fedplug.records import from_record, to_record
from fedplug.results import (
    Results,
    default_out,
    finish_results,
    mark,
    prepare_plotting,
    progress_log,
    write_status,
)
from fedplug.rounds import COHORT_RECORD, NODE_RECORD, TIMING_RECORD, RoundLoop, RunFailed, cohort_key, resume
from fedplug.strategies import make_strategy, sampling
from fedplug.tracking import track

log = logging.getLogger("fedplug.apps")


def _error(step: str, error: Exception) -> tuple[int, str]:
    """The error code and one-line reason of a client whose step raised."""
    reason = " ".join(str(error).split())[:240]
    return flower_adapter.client_app_raised_exception(), f"{step} raised {type(error).__name__}: {reason}"


def _failed(msg: Message, step: str, error: Exception) -> Message:
    """An error reply whose reason is the node's own one-line error; the traceback goes to the log."""
    log.error("%s failed on this node:\n%s", step, traceback.format_exc())
    code, reason = _error(step, error)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _client_step(msg: Message, context: Context, step: str) -> Message:
    if COHORT_RECORD in msg.content:  # a simulated SuperNode serving many clients (fedplug.rounds.Cohorts)
        return _cohort_step(msg, context, step)
    received, evaluation = folding.parts(msg.content)
    node = (context.run_config, context.node_config, context.node_id)
    partition = context.node_config.get("partition-id", context.node_id)
    content = RecordDict()
    if evaluation is not None:  # the previous round's evaluation folded into this training (fedplug.folding):
        evaluated = _records("evaluate", partition, partial(_work, evaluation, *node, "evaluate", state=context.state))
        for name, record in evaluated.items():  # the model is evaluated, then trained
            content[folding.PREFIX + name] = record
    records = _records(step, partition, partial(_work, received, *node, step, state=context.state))
    if evaluation is None:
        return folding.reply(records, msg)  # a failed step: Flower's error reply with the node's one-line reason
    for name, record in records.items():
        content[name] = record
    return Message(content=content, reply_to=msg)


def _records(step: str, partition: Any, work: Callable[[], RecordDict]) -> RecordDict:
    """One client's step (``work``, :func:`_work`) with its timing record, or its error record if it raised."""
    called, started = time.time(), time.perf_counter()
    try:
        records = work()
    except Exception as error:
        log.error("%s failed for partition %s:\n%s", step, partition, traceback.format_exc())
        return RecordDict({folding.ERROR_RECORD: folding.error_record(*_error(step, error))})
    records[TIMING_RECORD] = _timing(called, started)
    return records


def _work(
    received: RecordDict,
    run_config: Config,
    node_config: Config,
    node_id: int,
    step: str,
    weights: Weights | None = None,
    state: RecordDict | None = None,
) -> RecordDict:
    """One client's step (query, train or evaluate) on its own data: the reply's content.

    ``weights``: the received arrays, decoded once for the many clients of a cohort. ``state``: the node's
    state across rounds (Flower's ``Context.state``), for a strategy's node capabilities; a cohort serves
    only strategies that need none (``fedplug.strategies.use_cohorts``)."""
    backend, config, model = session(run_config, node_config)
    partition_id, num_partitions = identity(node_config, node_id)
    part = node_data(config, node_config)
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
        return content
    global_weights = weights if weights is not None else from_record(cast(ArrayRecord, received["arrays"]))
    sent = cast(dict[str, Scalar], dict(received.get("config", ConfigRecord())))
    step_config: dict[str, Scalar] = {**config, **sent, "partition-id": partition_id}
    node_state = RecordDict() if state is None else state
    if step == "train":
        # a personalised strategy (FedPer) trains from the node's personal model: fedplug.capabilities.train_start
        backend.set_weights(model, train_start(global_weights, received, node_state, step_config))
        metrics = backend.train(model, part.x_train, part.y_train, step_config)
        content["arrays"] = to_record(backend.get_weights(model))

        def train_other(start: Weights, other_config: Config) -> Weights:  # e.g. Ditto's personal model
            backend.set_weights(model, start)
            backend.train(model, part.x_train, part.y_train, other_config)
            return backend.get_weights(model)

        # a strategy's node-side capabilities (extra reply arrays, node state): fedplug.capabilities
        extend_train_reply(content, received, node_state, step_config, len(part.y_train), train_other)
    else:
        backend.set_weights(model, global_weights)
        metrics = dict(backend.evaluate(model, part.x_test, part.y_test, step_config))
        metrics.update(_personal_metrics(backend, model, part, global_weights, received, node_state, step_config))
    content["metrics"] = MetricRecord(dict(metrics.items()))
    return content


def _personal_metrics(
    backend: Backend,
    model: Any,
    part: Any,
    global_weights: Weights,
    received: RecordDict,
    state: RecordDict,
    config: Config,
) -> dict[str, float]:
    """A personalised strategy's evaluation of the node's personal model (``fedplug.personal``):
    ``personal-loss`` and ``personal-accuracy``, beside the global model's; nothing for other strategies."""
    personal = personal_weights(global_weights, received, state, config)
    if personal is None:
        return {}
    backend.set_weights(model, personal)
    metrics = backend.evaluate(model, part.x_test, part.y_test, config)
    return {"personal-loss": float(metrics["loss"]), "personal-accuracy": float(metrics["accuracy"])}


# -- cohorts: one simulated SuperNode serves many clients ----------------------------------


def _cohort_step(msg: Message, context: Context, step: str) -> Message:
    """Serve every client the message names, one after another, with this process's model.

    The reply carries each client's records under ``cohort_key(record, partition)``, or its
    error; the round loop expands it into one reply per client (:class:`fedplug.rounds.Cohorts`).
    """
    called, started = time.time(), time.perf_counter()
    request = msg.content[COHORT_RECORD]
    clients = int(request["clients"])  # type: ignore[arg-type]
    try:
        if step == "query":
            content = RecordDict({COHORT_RECORD: _cohort_answer(context, clients)})
            content[TIMING_RECORD] = _timing(called, started)
            return Message(content=content, reply_to=msg)
    except Exception as error:
        return _failed(msg, step, error)
    received, evaluation = folding.parts(RecordDict({k: v for k, v in msg.content.items() if k != COHORT_RECORD}))
    content = RecordDict()
    try:  # the global model, decoded once for all the cohort's clients
        weights = from_record(cast(ArrayRecord, received["arrays"]))
    except Exception as error:
        return _failed(msg, step, error)
    for array in weights.values():  # a backend that wrote into them would change the next client's start: it fails
        array.flags.writeable = False
    partitions = set(cast(list[int], request["partitions"]))
    jobs = [(received, step, "", partitions)]
    if evaluation is not None:  # a folded evaluation (fedplug.folding): its clients evaluate before any trains
        jobs.insert(0, (evaluation, "evaluate", folding.PREFIX, set(cast(list[int], request["evaluate-partitions"]))))
    for partition in sorted(set().union(*(served for *_, served in jobs))):
        node = (context.run_config, {"partition-id": partition, "num-partitions": clients}, context.node_id)
        for work, name, prefix, served in jobs:
            if partition in served:
                records = _records(name, partition, partial(_work, work, *node, name, weights))
                for key, record in records.items():
                    content[cohort_key(prefix + key, partition)] = record
    return Message(content=content, reply_to=msg)


def _cohort_answer(context: Context, clients: int) -> ConfigRecord:
    """The partitions this cohort serves (``p % cohorts == index``) with their backends and data sizes.

    The sizes come from the run's partition plan (computed once per run), not from cutting
    every client's data; each backend taking part in the cohort is built once and the data of its
    first client loaded, so a cohort that cannot serve (its backend or data fails) says so here,
    as a single node would.
    """
    index, cohorts = identity(context.node_config, context.node_id)
    served = slice(index, clients, max(cohorts, 1))
    partitions = list(range(clients))[served]
    mixed = bool(context.run_config.get("node-backends"))
    backends: list[str] = []
    for partition in partitions if mixed else partitions[:1]:
        node_config = {"partition-id": partition, "num-partitions": clients}
        backend, config, _ = session(context.run_config, node_config)
        backends.append(backend.name)
    if not partitions:
        empty: list[int] = []
        return ConfigRecord(
            {"cohorts": cohorts, "partitions": empty, "backends": [], "train-examples": empty, "test-examples": empty}
        )
    first = {"partition-id": partitions[0], "num-partitions": clients}
    _, config, _ = session(context.run_config, first)
    node_data(config, first)  # the data loads
    train, test = partition_sizes(config, clients)
    return ConfigRecord(
        {
            "cohorts": cohorts,
            "partitions": partitions,
            "backends": backends if mixed else backends * len(partitions),
            "train-examples": train[served].tolist(),
            "test-examples": test[served].tolist(),
        }
    )


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
    run_server(grid, context)


def run_server(
    grid: Grid, context: Context, cohorts: bool = False, finish: Callable[[Path, str], None] = finish_results
) -> None:
    """The ServerApp's work (:func:`main`). ``cohorts``: the Grid's nodes are cohorts, each serving many
    clients (the Simulation Engine's, see :func:`fedplug.simulation.cohort_count`); on the Deployment
    Engine every SuperNode is one client. ``finish(out, title)``: plot and status ``finished`` once the rest
    is written (the Simulation Engine's ends Ray's processes meanwhile, :func:`fedplug.simulation.finish_and_exit`)."""
    backend, config = backend_and_config(context.run_config)
    model = backend.build_model(str(config["model"]), data_spec(config), config)
    out = Path(str(config["out"])) if config["out"] else default_out(backend.name)
    mark(out, "server-start")
    strategy = make_strategy(config)
    evaluation = CentralEvaluation(backend, config, model)
    try:
        with track(config, out, progress_log) as tracking:  # --track: TensorBoard, MLflow (fedplug.tracking)
            arrays = _run_rounds(grid, strategy, config, out, backend.get_weights(model), evaluation, cohorts)
            mark(out, "rounds-done")
            backend.set_weights(model, from_record(arrays))
            backend.save(model, out / f"model{backend.file_suffix}")
            tracking.finished(out / f"model{backend.file_suffix}")
    except (RunFailed, ConfigError) as error:  # ConfigError: a tracker's library missing where the ServerApp runs
        write_status(out, "failed", str(error))
        raise
    finish(out, f"fedplug {backend.name} · {config['model']} · {config['strategy']}")


def _run_rounds(
    grid: Grid,
    strategy: Any,
    config: Config,
    out: Path,
    initial: Weights,
    evaluation: CentralEvaluation,
    cohorts: bool = False,
) -> ArrayRecord:
    """Round 0 (the initial model) and every round after it, or the rounds after the checkpoint in ``out``."""
    resumed = resume(out, strategy)
    results = Results(out, config, None if resumed is None else resumed.rounds)
    loop = RoundLoop(grid, strategy, config, sampling(config), results, evaluation, cohorts=cohorts)
    # matplotlib's import, off the teardown's path: started once this thread's own imports are done (the framework,
    # trackers, the DP accountant), since two threads importing at once can break an import
    prepare_plotting()
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
