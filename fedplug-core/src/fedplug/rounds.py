"""The ServerApp's round loop: seeded sampling, screened replies, a fixed aggregation order.

It drives one of Flower's strategies through its public methods (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) and the Grid's
``send_and_receive``, as ``Strategy.start`` does, and adds what a trustworthy
experiment needs and ``start`` does not have:

- Sampling depends only on the seed, the round and the partition ids (Flower samples
  its random node ids with the global ``random``): the loop learns each node's
  partition id with one query message, draws the round's partitions with its own
  seeded generator, and shows the strategy only the drawn nodes.
- Every reply is screened before the strategy sees it (``fedplug.validation``); a
  refused reply, an error reply and a missing reply (``round-timeout``) are failures of
  that node in that round, recorded with their reason.
- Replies are aggregated in partition order, so floating-point sums do not depend on
  which node answered first.
- A round with fewer good replies than the strategy's minimum is skipped; after
  ``max-failed-rounds`` skipped rounds in a row, or if the global model stops being
  finite, the run stops with ``RunFailed``.
- Each finished round leaves a checkpoint; ``resume`` continues from one exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedplug import checkpoint
from fedplug.backend import Config, Weights
from fedplug.node_backends import counts
from fedplug.records import from_record, to_record
from fedplug.results import Results
from fedplug.strategies import Sampling
from fedplug.validation import all_finite, check_metrics, check_weights, clip_update, update_norm

log = logging.getLogger("fedplug.rounds")
NODE_RECORD = "node"
"""Key of the ConfigRecord a node returns to the discovery query."""
TIMING_RECORD = "timing"
"""Key of the ConfigRecord in which a node reports when its step began and how long its own work took."""
TIMING_KEYS = ("seconds", "train-slowest-seconds", "evaluate-slowest-seconds", "compute-seconds")
"""Timings in a round's record: everything else is the same for two runs of one config and seed."""
NON_FINITE = "non-finite"
"""How the reasons of replies with NaN or infinite weights or metrics begin."""
JOIN_TIMEOUT = 120.0
"""Seconds the loop waits at least for nodes to answer the discovery query (their start-up included)."""


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why, in one line."""


@dataclass(frozen=True)
class NodeInfo:
    """What the server knows of a node, from its answer to the discovery query."""

    node_id: int
    partition: int
    backend: str
    train_examples: int
    test_examples: int


class _DrawnNodes:
    """The Grid as a strategy's ``configure_*`` sees it: only the nodes fedplug drew."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _reason(message: Message) -> str:
    """An error reply's reason on one line."""
    text = " ".join(str(message.error.reason).split())
    return text[:300] or f"error code {message.error.code}"


def _note_exchange(
    record: dict[str, Any], kind: str, drawn: list[NodeInfo], replies: list[Message], failures: list[dict[str, Any]]
) -> None:
    """Which partitions took part in the ``kind`` (train or evaluate) step, which failed and why."""
    record[f"{kind}-partitions"] = [info.partition for info in drawn]
    failed = {failure["partition"] for failure in failures}
    # mixed-framework federations: how many nodes of each backend replied usefully, which backend each partition ran
    record[f"{kind}-backends"] = counts(info.backend for info in drawn if info.partition not in failed)
    record.setdefault("partition-backends", {}).update({str(info.partition): info.backend for info in drawn})
    record["partition-backends"] = dict(sorted(record["partition-backends"].items(), key=lambda item: int(item[0])))
    record[f"{kind}-nodes"], record[f"{kind}-failed"], record[f"{kind}-failures"] = (
        len(replies),
        len(failures),
        failures,
    )


def _node_timing(reply: Message) -> tuple[float, float]:
    """(when the node's step began, how long its own work took) as the node reports them, or (0, 0)."""
    if reply.has_error() or TIMING_RECORD not in reply.content:
        return 0.0, 0.0
    timing = reply.content[TIMING_RECORD]
    try:
        return float(timing["called"]), float(timing["seconds"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return 0.0, 0.0


def _note_timing(record: dict[str, Any], kind: str, seconds: list[float]) -> None:
    """The slowest node's own time in the ``kind`` step, and the nodes' summed time in the round."""
    record[f"{kind}-slowest-seconds"] = round(max(seconds, default=0.0), 4)
    record["compute-seconds"] = round(record.get("compute-seconds", 0.0) + sum(seconds), 4)


def _note_metrics(record: dict[str, Any], kind: str, metrics: Any) -> None:
    record.update({f"{kind}-{k}": float(v) for k, v in metrics.items() if k in ("loss", "accuracy")})


def draw(partitions: list[int], fraction: float, minimum: int, seed: int, server_round: int, stream: int) -> list[int]:
    """The partitions that take part in a round: ``max(int(n * fraction), minimum)`` of them, seeded."""
    if fraction <= 0.0 or not partitions:
        return []
    count = min(len(partitions), max(int(len(partitions) * fraction), minimum))
    rng = np.random.default_rng([seed, server_round, stream])
    chosen = rng.choice(len(partitions), size=count, replace=False)
    return sorted(partitions[i] for i in chosen)


class RoundLoop:
    """Runs rounds ``first..last`` of one strategy on one Grid and records them in ``results``."""

    def __init__(
        self,
        grid: Grid,
        strategy: Any,
        config: Config,
        sampling: Sampling,
        results: Results,
        evaluate: Callable[[int, Weights], dict[str, float] | None],
    ) -> None:
        self.grid, self.strategy, self.config, self.sampling = grid, strategy, config, sampling
        self.results, self.evaluate = results, evaluate
        self.seed = int(config["seed"])
        self.timeout = float(config["round-timeout"])
        self.clip_norm = float(config["clip-norm"])
        self.max_failed = int(config["max-failed-rounds"])
        self.eval_every = int(config["eval-every"])
        self.outlier_factor = float(config["outlier-factor"])
        self.dtypes: dict[str, Any] = {}  # of the global model, set by run()
        self.nodes: dict[int, NodeInfo] = {}  # by node id
        self.unusable: dict[int, str] = {}  # nodes that could not answer the query (e.g. their data fails)
        self.new_unusable: list[dict[str, Any]] = []  # not yet in a round's record
        self.failed_in_a_row = 0
        self.node_seconds: list[float] = []  # each replying node's own time in the last exchange

    # -- nodes ----------------------------------------------------------------------

    def discover(self) -> dict[int, NodeInfo]:
        """Ask every node not yet known for its partition id, backend and data sizes."""
        unknown = [node for node in self.grid.get_node_ids() if node not in self.nodes]
        if unknown:
            messages = [
                Message(
                    content=RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type=MessageType.QUERY
                )
                for node in unknown
            ]
            replies = list(self.grid.send_and_receive(messages, timeout=max(self.timeout, JOIN_TIMEOUT)))
            called = [_node_timing(reply)[0] for reply in replies]
            if not self.nodes and any(called):
                self.results.mark("first-client-call", min(t for t in called if t))
            for reply in replies:
                node = reply.metadata.src_node_id
                if reply.has_error() or NODE_RECORD not in reply.content:
                    reason = _reason(reply) if reply.has_error() else "no node record in its reply"
                    if node not in self.unusable:
                        self.unusable[node] = reason
                        self.new_unusable.append({"node": node, "reason": reason})
                    continue
                info = reply.content[NODE_RECORD]
                self.nodes[node] = NodeInfo(
                    node,
                    int(info["partition-id"]),  # type: ignore[arg-type]
                    str(info["backend"]),
                    int(info["train-examples"]),  # type: ignore[arg-type]
                    int(info["test-examples"]),  # type: ignore[arg-type]
                )
        return self.nodes

    def _wait_for_nodes(self, needed: int) -> dict[int, NodeInfo]:
        # the first answers include the workers' start-up (imports, data): wait at least JOIN_TIMEOUT for them
        deadline = time.monotonic() + max(self.timeout, JOIN_TIMEOUT)
        while len(self.discover()) < needed and time.monotonic() < deadline:
            if not self.nodes and self.unusable and set(self.unusable) >= set(self.grid.get_node_ids()):
                reasons = sorted(set(self.unusable.values()))
                raise RunFailed(f"no node can take part: {'; '.join(reasons)[:400]}")
            time.sleep(1.0)
        return self.nodes

    def _drawn(self, server_round: int, train: bool) -> list[NodeInfo]:
        s = self.sampling
        nodes = self._wait_for_nodes(s.min_available_nodes)
        by_partition = {info.partition: info for info in nodes.values()}
        fraction, minimum = (
            (s.fraction_train, s.min_train_nodes) if train else (s.fraction_evaluate, s.min_evaluate_nodes)
        )
        chosen = draw(sorted(by_partition), fraction, minimum, self.seed, server_round, 0 if train else 1)
        return [by_partition[p] for p in chosen]

    # -- one exchange ---------------------------------------------------------------

    def _exchange(
        self, server_round: int, drawn: list[NodeInfo], arrays: ArrayRecord, train: bool
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Send the round's messages to the drawn nodes; return good replies in partition order and failures."""
        ids = [info.node_id for info in drawn]
        configure = self.strategy.configure_train if train else self.strategy.configure_evaluate
        config = ConfigRecord({"lr": self.config["lr"]} if train else {})
        messages = list(configure(server_round, arrays, config, _DrawnNodes(ids)))
        replies = {
            reply.metadata.src_node_id: reply for reply in self.grid.send_and_receive(messages, timeout=self.timeout)
        }
        self.node_seconds = [_node_timing(reply)[1] for reply in replies.values()]
        reference = from_record(arrays) if train else {}
        good: list[tuple[int, Message]] = []
        failures: list[dict[str, Any]] = []
        for info in drawn:
            reply = replies.get(info.node_id)
            reason = self._screen(reply, info, reference, train)
            if reason is None:
                assert reply is not None
                good.append((info.partition, reply))
            else:
                failures.append({"partition": info.partition, "reason": reason})
                log.warning(
                    "round %s: %s on partition %s failed: %s",
                    server_round,
                    "train" if train else "evaluate",
                    info.partition,
                    reason,
                )
        good.sort(key=lambda pair: pair[0])
        if train and self.outlier_factor > 0:
            good = self._drop_outliers(good, reference, failures)
        return [reply for _, reply in good], failures

    def _drop_outliers(
        self, good: list[tuple[int, Message]], reference: Weights, failures: list[dict[str, Any]]
    ) -> list[tuple[int, Message]]:
        """Refuse updates whose norm is ``outlier-factor`` times the round's median update norm or more."""
        if len(good) < 3:
            return good
        norms = [
            update_norm(from_record(next(iter(reply.content.array_records.values()))), reference) for _, reply in good
        ]
        limit = self.outlier_factor * float(np.median(norms))
        if limit <= 0:
            return good
        kept = []
        for (partition, reply), norm in zip(good, norms):
            if norm > limit:
                failures.append(
                    {"partition": partition, "reason": f"outlier update (norm {norm:.3g}, limit {limit:.3g})"}
                )
            else:
                kept.append((partition, reply))
        failures.sort(key=lambda failure: failure["partition"])
        return kept

    def _screen(self, reply: Message | None, info: NodeInfo, reference: Weights, train: bool) -> str | None:
        """Why a reply is refused, or None; clips an accepted update to ``clip-norm``."""
        if reply is None:
            return f"no reply within round-timeout ({self.timeout:g} s)"
        if reply.has_error():
            return _reason(reply)
        content = reply.content
        if len(content.metric_records) != 1:
            return "reply must carry one MetricRecord"
        metrics = next(iter(content.metric_records.values()))
        reason = check_metrics(metrics, info.train_examples if train else info.test_examples)
        if reason or not train:
            return reason
        if len(content.array_records) != 1:
            return "reply must carry one ArrayRecord of weights"
        key, record = next(iter(content.array_records.items()))
        try:
            weights = from_record(record)
        except Exception as error:  # a record that does not even decode
            return f"unreadable weights: {error}"
        reason = check_weights(weights, reference)
        if reason is None and self.clip_norm > 0:
            clipped = clip_update(weights, reference, self.clip_norm)
            if clipped is not weights:
                content[key] = to_record(clipped)
        return reason

    # -- rounds ---------------------------------------------------------------------

    def run(self, arrays: ArrayRecord, first: int, last: int) -> ArrayRecord:
        """Run rounds ``first..last`` (round 0 only evaluates the initial model); return the final arrays."""
        self.dtypes = {name: array.dtype for name, array in from_record(arrays).items()}
        for server_round in range(first, last + 1):
            started = time.monotonic()
            record: dict[str, Any] = {"round": server_round}
            # evaluation (federated and centralized): round 0, every eval-every-th round and the last
            evaluated = server_round % self.eval_every == 0 or server_round == last
            if server_round > 0:
                try:
                    arrays = self._train(server_round, arrays, record)
                except RunFailed:  # keep the failed round's record (not its model) for the user
                    self._note_unusable(record)
                    record["seconds"] = round(time.monotonic() - started, 3)
                    self.results.add_round(record)
                    raise
                if evaluated:
                    self._evaluate(server_round, arrays, record)
            self._note_unusable(record)
            weights = from_record(arrays)
            central = self.evaluate(server_round, weights) if evaluated else None
            if central:
                record.update({f"centralized-{k}": v for k, v in central.items()})
            record["seconds"] = round(time.monotonic() - started, 3)
            self.finish_round(server_round, weights, record)
        return arrays

    def _note_unusable(self, record: dict[str, Any]) -> None:
        if self.new_unusable:
            record["unusable-nodes"], self.new_unusable = self.new_unusable, []

    def finish_round(self, server_round: int, weights: Weights, record: dict[str, Any]) -> None:
        """Checkpoint first (it carries the metrics), then the results files."""
        rounds = [*self.results.rounds, record]
        checkpoint.save(
            self.results.out, server_round, weights, self.strategy, rounds, failed_in_a_row=self.failed_in_a_row
        )
        self.results.save_weights(weights)
        self.results.add_round(record)

    def _train(self, server_round: int, arrays: ArrayRecord, record: dict[str, Any]) -> ArrayRecord:
        drawn = self._drawn(server_round, train=True)
        if not drawn:
            if self.sampling.fraction_train <= 0:
                return arrays
            record["train-partitions"] = []
            return self._skip(server_round, arrays, record, [], self.sampling.min_available_nodes)
        replies, failures = self._exchange(server_round, drawn, arrays, train=True)
        _note_exchange(record, "train", drawn, replies, failures)
        _note_timing(record, "train", self.node_seconds)
        needed = max(1, min(self.sampling.min_train_nodes, len(drawn)))
        if len(replies) < needed:
            return self._skip(server_round, arrays, record, failures, needed)
        self.failed_in_a_row = 0
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if metrics is not None:
            _note_metrics(record, "train", metrics)
        if aggregated is None:
            return arrays
        weights = from_record(aggregated)
        if not all_finite(weights):
            raise RunFailed(
                f"the global model became non-finite in round {server_round} ({self.config['strategy']}); "
                "lower lr or set clip-norm"
            )
        # server optimisers (FedAdam, FedYogi, ...) compute in float64: the global model keeps the model's dtypes
        return to_record({name: array.astype(self.dtypes[name], copy=False) for name, array in weights.items()})

    def _skip(
        self,
        server_round: int,
        arrays: ArrayRecord,
        record: dict[str, Any],
        failures: list[dict[str, Any]],
        needed: int,
    ) -> ArrayRecord:
        self.failed_in_a_row += 1
        good = len(record["train-partitions"]) - len(failures)
        record["skipped"] = (
            f"{good} good replies, {needed} needed" if record["train-partitions"] else "no node available"
        )
        if failures and all(f["reason"].startswith(NON_FINITE) for f in failures):
            raise RunFailed(
                f"training diverged in round {server_round}: every node returned non-finite weights or metrics "
                f"(lr={self.config['lr']}); lower lr"
            )
        if self.failed_in_a_row >= self.max_failed:
            reasons = sorted({f["reason"] for f in failures})
            raise RunFailed(
                f"no usable training result in {self.failed_in_a_row} rounds in a row (last: round {server_round}): "
                + ("; ".join(reasons)[:400] or "no node replied")
            )
        log.warning("round %s skipped: %s", server_round, record["skipped"])
        return arrays

    def _evaluate(self, server_round: int, arrays: ArrayRecord, record: dict[str, Any]) -> None:
        drawn = self._drawn(server_round, train=False)
        if not drawn:
            return
        replies, failures = self._exchange(server_round, drawn, arrays, train=False)
        _note_exchange(record, "evaluate", drawn, replies, failures)
        _note_timing(record, "evaluate", self.node_seconds)
        if replies:
            metrics = self.strategy.aggregate_evaluate(server_round, replies)
            if metrics is not None:
                _note_metrics(record, "evaluate", metrics)


def resume_state(out: Path, strategy: Any) -> tuple[int, Weights, list[dict[str, Any]], int] | None:
    """Restore the strategy from ``out``'s newest checkpoint; (round, weights, rounds, failed in a row)."""
    saved = checkpoint.latest(out)
    if saved is None:
        return None
    checkpoint.restore_strategy(strategy, saved.strategy["layout"], saved.strategy["arrays"])
    return saved.round, saved.weights, saved.rounds, int(saved.extra.get("failed_in_a_row", 0))
