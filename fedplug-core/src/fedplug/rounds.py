"""The ServerApp's round loop: seeded sampling, screened replies, a fixed aggregation order.

``RoundLoop.run`` reads as Flower's ``Strategy.start``: per round, train (configure,
send and receive, aggregate), evaluate, evaluate centrally; it returns the final model.
It drives one of Flower's strategies through their public methods and the Grid's
``send_and_receive``, and adds what a trustworthy experiment needs and ``start`` does not have:

- **The strategy samples nothing.** Each round's nodes are drawn by ``draw`` from the
  seed, the round and the population, and the strategy's ``configure_*`` sees only the
  drawn nodes (``fedplug.strategies.make_strategy`` builds it to take all of them).
  Flower samples its random node ids with the global ``random``; fedplug draws partitions.
- **The population** that a round draws from is the partitions of the usable nodes, and
  the loop knows it completely before it draws: it waits until every node the Grid lists
  has answered the discovery query (or waited ``max(round-timeout, JOIN_TIMEOUT)`` for
  it: then it is unusable, with that reason), so the draw never depends on which nodes
  answered first. A node that cannot answer (its data or backend fails) is unusable for
  the same reason on every machine, so:

  - on the Simulation Engine, and for deployed nodes started with ``--partition-id I
    --num-partitions N``, the population is the partitions ``0..N-1`` (the loop waits for
    all N nodes, at most that long after it began) less the unusable nodes': the same in
    every round and every run of one config and seed, however fast the machine.
  - for deployed nodes with their own data (``fedplug supernode --data``, partition = node
    id), the population of a round is the usable nodes that the SuperLink lists when the
    round begins (the loop waits for ``min-available-nodes`` of them). Nodes join and leave
    over time, so this population may differ between two runs; the draw from it does not.

- **Discovery is separate** (``Discovery``): one query per node, its answer (partition id,
  backend, data sizes) collected whenever it arrives; sent again, with back-off in rounds, to
  a node whose query failed.
- Every reply is screened before the strategy sees it (``fedplug.validation``); a
  refused reply, an error reply and a missing reply (``round-timeout``) are failures of
  that node in that round, recorded with their reason.
- Replies are aggregated in partition order, so floating-point sums do not depend on
  which node answered first.
- A round with fewer good replies than the strategy's minimum is skipped; after
  ``max-failed-rounds`` skipped rounds in a row, or if the global model stops being
  finite, the run stops with ``RunFailed``.
- Each finished round leaves a checkpoint; ``resume`` continues from one exactly.

Each round is recorded in a typed ``RoundRecord``; ``RoundRecord.to_json`` is the round's
entry in ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedplug import checkpoint, dp, folding, secagg
from fedplug.backend import Config, Weights
from fedplug.capabilities import STATE_RECORD, reply_problem, take_state
from fedplug.node_backends import counts
from fedplug.records import from_record, to_record
from fedplug.results import Results
from fedplug.strategies import Sampling, descriptor, fold_evaluation
from fedplug.validation import NUM_EXAMPLES, all_finite, check_metrics, check_weights, clip_update, update_norm

__all__ = [
    "COHORT_RECORD",
    "JOIN_TIMEOUT",
    "NODE_RECORD",
    "TIMING_KEYS",
    "TIMING_RECORD",
    "Cohorts",
    "Discovery",
    "Exchange",
    "NodeInfo",
    "Resumed",
    "RoundLoop",
    "RoundRecord",
    "RunFailed",
    "Sampling",
    "cohort_key",
    "draw",
    "poisson_draw",
    "resume",
    "sample",
]

log = logging.getLogger("fedplug.rounds")
NODE_RECORD = "node"
"""Key of the ConfigRecord a node returns to the discovery query."""
COHORT_RECORD = "cohort"
"""Key of the ConfigRecord of a message to a cohort (a simulated SuperNode serving many clients), and of its answer."""
TIMING_RECORD = "timing"
"""Key of the ConfigRecord in which a node reports when its step began and how long its own work took."""
TIMING_KEYS = ("seconds", "train-slowest-seconds", "evaluate-slowest-seconds", "compute-seconds", "evaluate-folded")
"""Timings, and whether the evaluation travelled with the next training, in a round's record: everything else is
the same for two runs of one config and seed."""
NON_FINITE = "non-finite"
"""How the reasons of replies with NaN or infinite weights or metrics begin."""
JOIN_TIMEOUT = 120.0
"""Seconds the loop waits at least for a node to answer the discovery query (its start-up included)."""
POLL_SECONDS = 0.2
"""How often discovery looks for new nodes and answers while a round waits for them."""
RETRY_WAIT = 10.0
"""Seconds a round waits at most for the answer of a node queried again (see ``Discovery``)."""
MAX_BACKOFF_ROUNDS = 16
"""The longest a node whose query failed waits for its next query, in rounds (see ``Discovery``)."""
COHORT_POLL_SECONDS = 0.01
"""How often cohort discovery looks for the cohorts' answers (a few messages: polling is cheap)."""


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why, in one line."""


# -- nodes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """What the server knows of a node, from its answer to the discovery query."""

    node_id: int
    partition: int
    backend: str
    train_examples: int
    test_examples: int


def query_message(node_id: int) -> Message:
    """The discovery query to one node (Flower's ``Message`` needs a running ServerApp)."""
    return Message(content=RecordDict({"config": ConfigRecord()}), dst_node_id=node_id, message_type=MessageType.QUERY)


def _reason(message: Message) -> str:
    """An error reply's reason on one line."""
    text = " ".join(str(message.error.reason).split())
    return text[:300] or f"error code {message.error.code}"


def _node_timing(reply: Message) -> tuple[float, float]:
    """(when the node's step began, how long its own work took) as the node reports them, or (0, 0)."""
    if reply.has_error() or TIMING_RECORD not in reply.content:
        return 0.0, 0.0
    timing = reply.content[TIMING_RECORD]
    try:
        return float(timing["called"]), float(timing["seconds"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return 0.0, 0.0


class Discovery:
    """Which node holds which partition: one query to each node the Grid lists, answers taken as they arrive.

    A node that cannot answer (its data or backend fails) is unusable, with its reason. In a
    partitioned federation (nodes declare ``num-partitions`` N > 0) a node whose partition is
    outside ``0..N-1``, whose N differs from the first node's, or whose partition another node
    holds already, is unusable too.

    A node whose query failed (an error reply: its data was missing, its SuperNode was offline)
    is asked again with exponential back-off in rounds: the round after its query, then 2, 4,
    8 and at most ``MAX_BACKOFF_ROUNDS`` rounds after the last one, so that a node which recovers
    takes part again and one that does not costs a query in ever fewer rounds. The schedule
    depends on the rounds alone; a round waits at most ``retry_wait`` seconds for such an answer
    (an answer that comes later is taken when it arrives).
    """

    def __init__(
        self,
        grid: Grid,
        wait: float,
        query: Callable[[int], Message] = query_message,
        retry_wait: float = RETRY_WAIT,
    ) -> None:
        self.grid, self.wait, self.query, self.retry_wait = grid, wait, query, min(retry_wait, wait)
        self.nodes: dict[int, NodeInfo] = {}
        """Usable nodes by partition."""
        self.unusable: dict[int, str] = {}
        """Why each unusable node (by node id) cannot take part."""
        self.partitions: int | None = None
        """N of a partitioned federation, 0 for nodes with their own data, None before the first answer."""
        self.first_call: float | None = None
        """When the first answering node began its answer (wall clock), as it reports it."""
        self._asked: dict[int, float] = {}  # node id -> when its query was sent
        self._pending: set[str] = set()  # ids of queries not answered yet
        self._answered: set[int] = set()
        self._reported: set[int] = set()  # unusable nodes that take_unusable has returned
        self._started = 0.0  # when the first poll began
        self._round: int | None = None  # the round whose population is being found (None: outside rounds)
        self._failed: dict[int, int] = {}  # node id -> failed queries in a row
        self._sent_in: dict[int, int] = {}  # node id -> round in which its last query was sent (0: before rounds)
        self._retry_in: dict[int, int] = {}  # node id -> round in which to query it again
        self._retrying: dict[int, float] = {}  # node id -> when its query was sent again, until it answers

    def _since_start(self) -> float:
        return time.monotonic() - self._started

    def poll(self) -> None:
        """Ask the nodes listed since the last poll; take the answers that have arrived."""
        self._started = self._started or time.monotonic()
        current = self.grid.get_node_ids()
        listed = [node for node in current if node not in self._asked]
        # a node whose query failed, when its round has come and the Grid lists it (one gone is asked once back)
        due = sorted(node for node in current if node in self._retry_in and (self._round or 0) >= self._retry_in[node])
        if listed or due:
            self._pending.update(self.grid.push_messages([self.query(node) for node in [*listed, *due]]))
            now = time.monotonic()
            self._asked.update(dict.fromkeys(listed, now))
            self._sent_in.update(dict.fromkeys([*listed, *due], self._round or 0))
            self._retrying.update(dict.fromkeys(due, now))
            for node in due:
                del self._retry_in[node]
        if self._pending:
            replies = list(self.grid.pull_messages(sorted(self._pending)))
            self._pending.difference_update(reply.metadata.reply_to_message_id for reply in replies)
            for reply in sorted(replies, key=lambda reply: reply.metadata.src_node_id):
                self._take(reply)
            called = [t for t in (_node_timing(reply)[0] for reply in replies) if t]
            if self.first_call is None and called:
                self.first_call = min(called)

    def _take(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        self._answered.add(node)
        self._retrying.pop(node, None)
        reason = self._refusal(reply)
        if reason is not None:
            self.unusable.setdefault(node, reason)
            if reply.has_error():  # it may recover: ask again later, ever less often
                self._failed[node] = self._failed.get(node, 0) + 1
                backoff = min(2 ** (self._failed[node] - 1), MAX_BACKOFF_ROUNDS)
                self._retry_in[node] = self._sent_in.get(node, 0) + backoff
            return
        self._failed.pop(node, None)
        self.unusable.pop(node, None)  # it had not answered in time, or failed before: it takes part from now on
        info = reply.content[NODE_RECORD]
        partition = int(info["partition-id"])  # type: ignore[arg-type]
        self.nodes[partition] = NodeInfo(
            node,
            partition,
            str(info["backend"]),
            int(info["train-examples"]),  # type: ignore[arg-type]
            int(info["test-examples"]),  # type: ignore[arg-type]
        )

    def _refusal(self, reply: Message) -> str | None:
        if reply.has_error():
            return _reason(reply)
        if NODE_RECORD not in reply.content:
            return "no node record in its reply"
        info = reply.content[NODE_RECORD]
        partition, declared = int(info["partition-id"]), int(info.get("num-partitions", 0))  # type: ignore[arg-type]
        if self.partitions is None:
            self.partitions = declared
        if declared != self.partitions:
            return f"declares {declared} partitions, but the federation's first node declared {self.partitions}"
        if declared and not 0 <= partition < declared:
            return f"declares partition {partition}, outside 0..{declared - 1}"
        if partition in self.nodes:
            return f"declares partition {partition}, which node {self.nodes[partition].node_id} holds"
        return None

    def _waiting(self) -> bool:
        """Whether a query sent less than ``wait`` seconds ago (``retry_wait`` for a query sent again) is unanswered."""
        now = time.monotonic()
        return any(now - sent < self.wait for node, sent in self._asked.items() if node not in self._answered) or any(
            now - sent < self.retry_wait for sent in self._retrying.values()
        )

    def _give_up(self) -> None:
        """Nodes whose query has waited ``wait`` seconds are unusable (an answer later makes them usable)."""
        now = time.monotonic()
        for node, sent in self._asked.items():
            if node not in self._answered and now - sent >= self.wait and node not in self.unusable:
                self.unusable[node] = f"no answer to the discovery query within {self.wait:g} s"

    def population(self, needed: int, server_round: int | None = None) -> list[int]:
        """The partitions round ``server_round`` draws from (see the module's docstring), once every listed node has
        answered.

        Waits until each node the Grid lists has answered the query or waited ``wait`` seconds
        for it; in a partitioned federation also until all N nodes are listed (for at most
        ``wait`` seconds after discovery began), else until ``needed`` nodes are usable (for
        at most ``wait`` seconds per round). Nodes whose query failed are asked again in the
        rounds their back-off gives (not when ``server_round`` is None).
        """
        self._round = server_round
        began = time.monotonic()

        def complete() -> bool:
            self.poll()
            if self._waiting():
                return False
            if self.partitions:  # a partitioned federation: all N nodes, or as many as joined in time
                return len(self._asked) >= self.partitions or self._since_start() >= self.wait
            if self.partitions is None:  # no node has answered yet
                return self._since_start() >= self.wait
            return len(self.nodes) >= needed or time.monotonic() - began >= self.wait

        while not complete():
            if self._asked and not self.nodes and set(self.unusable) >= set(self._asked):
                reasons = sorted(set(self.unusable.values()))
                raise RunFailed(f"no node can take part: {'; '.join(reasons)[:400]}")
            time.sleep(POLL_SECONDS)
        self._give_up()
        return sorted(self.nodes)

    def take_unusable(self) -> list[dict[str, Any]]:
        """The nodes found unusable since the last call, with their reasons."""
        found = [
            {"node": node, "reason": reason} for node, reason in self.unusable.items() if node not in self._reported
        ]
        self._reported.update(self.unusable)
        return found


# -- cohorts: a few simulated SuperNodes, each serving many clients ---------------------


def cohort_key(record: str, partition: int) -> str:
    """The key of a client's record (``arrays``, ``metrics``, ``timing``, ``error``) in a cohort's reply."""
    return f"{record}.{partition}"


class _Clients(Mapping[int, NodeInfo]):
    """Clients by partition, held as arrays: a ``NodeInfo`` is made only for a client that is looked up."""

    def __init__(self) -> None:
        self.partitions = np.zeros(0, dtype=np.int64)  # sorted
        self.columns = np.zeros((0, 4), dtype=np.int64)  # cohort index, backend index, train, test examples
        self.backends: list[str] = []
        self.cohorts: list[int] = []  # node ids (Flower's are unsigned 64-bit: not in an int64 column)

    def add(self, node: int, partitions: list[int], backends: list[str], train: list[int], test: list[int]) -> None:
        names = {name: self._backend(name) for name in dict.fromkeys(backends)}
        columns = np.column_stack(
            [np.full(len(partitions), len(self.cohorts)), [names[name] for name in backends], train, test]
        ).astype(np.int64)
        self.cohorts.append(node)
        merged = np.concatenate([self.partitions, np.asarray(partitions, dtype=np.int64)])
        order = np.argsort(merged, kind="stable")
        self.partitions, self.columns = merged[order], np.concatenate([self.columns, columns.reshape(-1, 4)])[order]

    def _backend(self, name: str) -> int:
        if name not in self.backends:
            self.backends.append(name)
        return self.backends.index(name)

    def _row(self, partition: int) -> int:
        row = int(np.searchsorted(self.partitions, partition))
        if row >= len(self.partitions) or self.partitions[row] != partition:
            raise KeyError(partition)
        return row

    def __getitem__(self, partition: int) -> NodeInfo:
        _, backend, train, test = (int(v) for v in self.columns[self._row(partition)])
        return NodeInfo(int(partition), int(partition), self.backends[backend], train, test)

    def cohort(self, partition: int) -> int:
        """The node id of the cohort that serves ``partition``."""
        return self.cohorts[int(self.columns[self._row(partition), 0])]

    def __contains__(self, partition: object) -> bool:
        try:
            self._row(int(partition))  # type: ignore[call-overload]
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __iter__(self) -> Iterator[int]:
        return (int(p) for p in self.partitions)

    def __len__(self) -> int:
        return len(self.partitions)


class Cohorts:
    """The population of a simulation whose SuperNodes are cohorts, each serving many clients (partitions).

    ``num-supernodes`` (``--nodes``) still counts clients: the Simulation Engine runs a few
    SuperNodes (``fedplug.simulation.cohort_count``), and cohort ``i`` of ``C`` serves the
    partitions ``p`` with ``p % C == i``. Discovery asks each cohort once, and it answers for all
    its clients at once (partitions, backends and data sizes as lists), so the population costs
    one message per cohort, not per client, and is held as arrays (``_Clients``). A client's
    ``NodeInfo.node_id`` is its partition: the id the strategy addresses it by.

    ``exchange`` sends one message per cohort that has drawn clients, carrying their partitions
    and the strategy's content (the same for each client, as Flower's strategies send it), and
    expands each cohort's reply into one reply per client, in Flower's ``Message`` (a reply to the
    strategy's message to that client): the round loop screens each and the strategy aggregates
    them as if each client had been a node. A client whose step raised gets its error reply; a
    cohort that failed as a whole gives each of its clients its error; a cohort that did not
    answer within ``round-timeout`` leaves its clients without a reply.
    """

    def __init__(self, grid: Grid, wait: float, clients: int) -> None:
        self.grid, self.wait, self.clients = grid, wait, clients
        self.nodes = _Clients()
        self.unusable: dict[int, str] = {}
        self.first_call: float | None = None
        self._reported: set[int] = set()
        self._asked: set[int] = set()

    def _query(self, node: int) -> Message:
        content = RecordDict({COHORT_RECORD: ConfigRecord({"clients": self.clients})})
        return Message(content=content, dst_node_id=node, message_type=MessageType.QUERY)

    def population(self, needed: int, server_round: int | None = None) -> list[int] | np.ndarray:
        """All partitions of the usable cohorts; asks the cohorts once, waiting for every one (at most ``wait``)."""
        if not self._asked:
            self._discover()
        return self.nodes.partitions

    def _discover(self) -> None:
        """Ask every cohort the engine lists, until all C have answered (an answer says C) or ``wait`` is over."""
        began, expected = time.monotonic(), None
        pending: dict[str, int] = {}  # query message id -> cohort node id
        while True:
            listed = [node for node in self.grid.get_node_ids() if node not in self._asked]
            if listed:
                pending.update(zip(self.grid.push_messages([self._query(node) for node in listed]), listed))
                self._asked.update(listed)
            if pending:
                for reply in sorted(self.grid.pull_messages(list(pending)), key=lambda r: r.metadata.src_node_id):
                    expected = self._take(pending.pop(reply.metadata.reply_to_message_id), reply) or expected
            if not pending and self._asked:
                if expected is not None and len(self._asked) >= expected:
                    break
                if not len(self.nodes) and set(self.unusable) >= self._asked:
                    reasons = "; ".join(sorted(set(self.unusable.values())))
                    raise RunFailed(f"no node can take part: {reasons[:400]}")
            if time.monotonic() - began >= self.wait:
                break
            time.sleep(COHORT_POLL_SECONDS)
        for node in pending.values():
            self.unusable[node] = f"no answer to the discovery query within {self.wait:g} s"
        if not len(self.nodes):
            reasons = "; ".join(sorted(set(self.unusable.values()))) or "no node joined"
            raise RunFailed(f"no node can take part: {reasons[:400]}")

    def _take(self, node: int, reply: Message) -> int | None:
        """Take a cohort's answer; the number of cohorts it declares (None if it cannot take part)."""
        called = _node_timing(reply)[0]
        if called and (self.first_call is None or called < self.first_call):
            self.first_call = called
        if reply.has_error():
            self.unusable[node] = _reason(reply)
            return None
        if COHORT_RECORD not in reply.content:
            self.unusable[node] = "no cohort record in its reply"
            return None
        answer = reply.content[COHORT_RECORD]
        partitions, backends, train, test = (
            cast(list[Any], answer[key]) for key in ("partitions", "backends", "train-examples", "test-examples")
        )
        self.nodes.add(node, partitions, backends, train, test)
        return int(cast(int, answer["cohorts"]))

    def take_unusable(self) -> list[dict[str, Any]]:
        """The cohorts found unusable since the last call, with their reasons."""
        found = [{"node": node, "reason": why} for node, why in self.unusable.items() if node not in self._reported]
        self._reported.update(self.unusable)
        return found

    def exchange(
        self, messages: list[Message], timeout: float, evaluations: Sequence[Message] = ()
    ) -> tuple[dict[int, Message], dict[int, Message]]:
        """Send the strategy's per-client messages as one message per cohort, with a previous round's evaluation
        messages folded in (``fedplug.folding``); each step's client replies by client id."""
        steps = (self._by_cohort(messages), self._by_cohort(evaluations))
        sent: list[tuple[Message, list[Message], list[Message]]] = []  # (sent, the step's, the evaluation's)
        for node in sorted(set(steps[0]) | set(steps[1])):
            group, evaluate = steps[0].get(node, []), steps[1].get(node, [])
            content = folding.merged(group[0].content, evaluate[0].content) if group and evaluate else None
            if content is not None and group[0].metadata.message_type == MessageType.TRAIN:
                sent.append((self._message(node, content, group, evaluate), group, evaluate))
                continue
            if group:
                sent.append((self._message(node, group[0].content, group), group, []))
            if evaluate:  # the evaluation alone: its own message, as if it were the step
                sent.append((self._message(node, evaluate[0].content, evaluate), [], evaluate))
        answers = self.grid.send_and_receive([message for message, _, _ in sent], timeout=timeout)
        by_message = {answer.metadata.reply_to_message_id: answer for answer in answers}
        out: tuple[dict[int, Message], dict[int, Message]] = ({}, {})
        for message, group, evaluate in sent:
            folded = bool(group and evaluate)
            answer = by_message.get(message.metadata.message_id)
            out[0].update(self._client_replies(answer, group, folded, evaluation=False))
            out[1].update(self._client_replies(answer, evaluate, folded, evaluation=True))
        return out

    def _by_cohort(self, messages: Sequence[Message]) -> dict[int, list[Message]]:
        grouped: dict[int, list[Message]] = {}
        for message in messages:
            grouped.setdefault(self.nodes.cohort(message.metadata.dst_node_id), []).append(message)
        return grouped

    def _message(
        self, node: int, content: RecordDict, group: list[Message], evaluate: Sequence[Message] = ()
    ) -> Message:
        """The message to one cohort: the content of its clients' messages (the same for each, as Flower's
        strategies send it), and which of its clients take the step and which the folded evaluation."""
        for same in (group, evaluate):
            if any(not _same_content(other.content, same[0].content) for other in same[1:]):
                raise RunFailed("the strategy sends different content to the clients of a round; set cohorts=false")
        request: dict[str, Any] = {"clients": self.clients, "partitions": [m.metadata.dst_node_id for m in group]}
        if evaluate:
            request["evaluate-partitions"] = [m.metadata.dst_node_id for m in evaluate]
        cohort = RecordDict(dict(content.items()))
        cohort[COHORT_RECORD] = ConfigRecord(request)
        return Message(content=cohort, dst_node_id=node, message_type=group[0].metadata.message_type)

    @staticmethod
    def _client_replies(
        answer: Message | None, group: Sequence[Message], folded: bool, evaluation: bool
    ) -> dict[int, Message]:
        """Each client's reply (by its id), cut from its cohort's; none without an answer from the cohort.
        ``folded``: the answer carries a step and an evaluation; ``evaluation``: the replies wanted are the latter."""
        if answer is None or not group:
            return {}
        if answer.has_error():  # the cohort failed as a whole: each of its clients with its error
            error = answer.error
            return {m.metadata.dst_node_id: Message(Error(error.code, error.reason), reply_to=m) for m in group}
        records: dict[int, dict[str, Any]] = {}
        for key, record in answer.content.items():
            name, _, partition = key.rpartition(".")
            records.setdefault(int(partition), {})[name] = record
        out = {}
        for message in group:
            client = records.get(message.metadata.dst_node_id, {})
            if folded:
                client = folding.unfold(client.items())[1 if evaluation else 0]
            out[message.metadata.dst_node_id] = folding.reply(client, message)
        return out


def _same_content(a: RecordDict, b: RecordDict) -> bool:
    """Whether two messages carry the same records (Flower's strategies send one RecordDict to every node)."""
    return a is b or (list(a.keys()) == list(b.keys()) and all(a[k] is b[k] or a[k] == b[k] for k in a))


def draw(
    partitions: Sequence[int] | np.ndarray, fraction: float, minimum: int, seed: int, server_round: int, stream: int
) -> list[int]:
    """The partitions that take part in a round: ``max(int(n * fraction), minimum)`` of them, seeded."""
    if fraction <= 0.0 or len(partitions) == 0:
        return []
    count = min(len(partitions), max(int(len(partitions) * fraction), minimum))
    rng = np.random.default_rng([seed, server_round, stream])
    chosen = rng.choice(len(partitions), size=count, replace=False)
    return sorted(int(partitions[i]) for i in chosen)


# -- differential privacy (fedplug.dp): Poisson sampling ----------------------------------
POISSON_STREAM = 2
"""The stream of ``poisson_draw``: a draw of its own, never the train (0) or evaluate (1) draw."""


def poisson_draw(partitions: Sequence[int] | np.ndarray, fraction: float, seed: int, server_round: int) -> list[int]:
    """Each partition independently with probability ``fraction``, seeded: what the DP accountant assumes.

    Used for training under central DP with ``fraction-train`` below 1 (``fedplug.dp.poisson``); the
    number drawn varies from round to round and may be 0 (the round is then skipped).
    """
    rng = np.random.default_rng([seed, server_round, POISSON_STREAM])
    taken = rng.random(len(partitions)) < fraction
    return [int(partition) for partition, take in zip(sorted(partitions), taken) if take]


def sample(
    discovery: Discovery | Cohorts, sampling: Sampling, seed: int, server_round: int, train: bool, poisson: bool = False
) -> list[NodeInfo]:
    """The nodes of a round's step, drawn by partition from the seed, the round and the population only.

    ``poisson``: training nodes by ``poisson_draw`` (differential privacy), not a fixed count.
    """
    fraction, minimum = (
        (sampling.fraction_train, sampling.min_train_nodes)
        if train
        else (sampling.fraction_evaluate, sampling.min_evaluate_nodes)
    )
    if fraction <= 0:
        return []
    population = discovery.population(sampling.min_available_nodes, server_round)
    if poisson and train:
        chosen = poisson_draw(population, fraction, seed, server_round)
    else:
        chosen = draw(population, fraction, minimum, seed, server_round, 0 if train else 1)
    return [discovery.nodes[partition] for partition in chosen]


class _DrawnNodes:
    """The Grid as a strategy's ``configure_*`` sees it: only the nodes fedplug drew."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


# -- the round record ------------------------------------------------------------------


@dataclass
class Exchange:
    """One step of a round, train or evaluate: the drawn nodes, their good replies, the failures and why."""

    nodes: list[NodeInfo]
    """The drawn nodes, in partition order."""
    replies: list[Message] = field(default_factory=list)
    """Good replies, in partition order: what the strategy aggregates."""
    failures: list[dict[str, Any]] = field(default_factory=list)
    """``{"partition", "reason"}`` of every drawn node without a good reply, in partition order."""
    node_seconds: list[float] = field(default_factory=list)
    """Each replying node's own time."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The strategy's aggregated loss and accuracy."""
    aggregate: Message | None = None
    """With secagg: the one reply the strategy aggregates (the replies' weighted mean, ``fedplug.secagg``)."""

    @property
    def partitions(self) -> list[int]:
        return [info.partition for info in self.nodes]


@dataclass
class RoundRecord:
    """One round: what ``metrics.json`` and the checkpoint keep of it."""

    round: int
    train: Exchange | None = None
    evaluate: Exchange | None = None
    skipped: str | None = None
    unusable: list[dict[str, Any]] = field(default_factory=list)
    """Nodes found unusable during this round (``unusable-nodes``)."""
    centralized: dict[str, float] = field(default_factory=dict)
    personal: dict[str, Any] = field(default_factory=dict)
    """Personalised strategies (``fedplug.personal``): ``personal-loss``, ``personal-accuracy`` (example-weighted)
    and ``personal-accuracy-per-node`` (by partition) of the nodes' personal models."""
    privacy: dict[str, float | str] = field(default_factory=dict)
    """Differential privacy: ``epsilon`` and ``delta`` spent after this round, why the run stopped (``fedplug.dp``)."""
    folded: bool = False
    """Its federated evaluation travelled with the next round's training (``fedplug.folding``)."""
    seconds: float = 0.0
    """Wall time from the round's start to the next round's start, or to its record's completion if its
    evaluation was not folded (the last round's includes its evaluation): the rounds' seconds add up to the run's."""

    def to_json(self) -> dict[str, Any]:
        """The round's entry in ``metrics.json``: the keys, values and key order fedplug has always written."""
        out: dict[str, Any] = {"round": self.round}
        backends: dict[int, str] = {}
        for kind, step in (("train", self.train), ("evaluate", self.evaluate)):
            if step is None:
                continue
            out[f"{kind}-partitions"] = step.partitions
            if step.nodes:  # a round without nodes to draw from records only that
                failed = {failure["partition"] for failure in step.failures}
                # mixed-framework federations: how many nodes of each backend replied usefully, which backend each
                # partition ran (a key that keeps its place when the evaluate step adds to it)
                out[f"{kind}-backends"] = counts(info.backend for info in step.nodes if info.partition not in failed)
                backends.update({info.partition: info.backend for info in step.nodes})
                out["partition-backends"] = {str(p): backends[p] for p in sorted(backends)}
                out[f"{kind}-nodes"] = len(step.replies)
                out[f"{kind}-failed"] = len(step.failures)
                out[f"{kind}-failures"] = step.failures
                out[f"{kind}-slowest-seconds"] = round(max(step.node_seconds, default=0.0), 4)
                out["compute-seconds"] = round(out.get("compute-seconds", 0.0) + sum(step.node_seconds), 4)
            if kind == "train" and self.skipped is not None:
                out["skipped"] = self.skipped
            out.update({f"{kind}-{name}": value for name, value in step.metrics.items()})
            if kind == "evaluate" and self.folded:
                out["evaluate-folded"] = True
        out.update(self.personal)  # personalised strategies' evaluation (fedplug.personal)
        if self.unusable:
            out["unusable-nodes"] = self.unusable
        out.update({f"centralized-{name}": value for name, value in self.centralized.items()})
        out.update(self.privacy)  # differential privacy: epsilon, delta (fedplug.dp)
        out["seconds"] = self.seconds
        return out


# -- the loop --------------------------------------------------------------------------


@dataclass(frozen=True)
class Resumed:
    """Where a checkpointed run stands: its last round, global model, records and skipped rounds in a row."""

    round: int
    weights: Weights
    rounds: list[dict[str, Any]]
    failed_in_a_row: int
    node_states: dict[int, Weights] = field(default_factory=dict)
    """Each partition's node state (the ``node-state`` capability), by partition."""


@dataclass
class _Pending:
    """A round whose record waits for its federated evaluation, folded into the next round's training exchange."""

    round: int
    arrays: ArrayRecord
    record: RoundRecord
    failed: int
    step: Exchange
    messages: list[Message]
    started: float = 0.0
    """When the round began."""
    closed: bool = False


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
        cohorts: bool = False,
    ) -> None:
        """``cohorts``: the Grid's nodes are cohorts serving many clients each (:class:`Cohorts`, simulation only)."""
        self.grid, self.strategy, self.config, self.sampling = grid, strategy, config, sampling
        self.results, self.evaluate = results, evaluate
        self.seed = int(config["seed"])
        self.timeout = float(config["round-timeout"])
        wait = max(self.timeout, JOIN_TIMEOUT)
        self.discovery: Discovery | Cohorts = (
            Cohorts(grid, wait, clients=int(config["num-supernodes"])) if cohorts else Discovery(grid, wait=wait)
        )
        self._marked = False  # the timeline has its first-client-call
        # -- the strategy's node capabilities (fedplug.capabilities) --
        self.descriptor = descriptor(str(config["strategy"]))
        self.node_states: dict[int, Weights] = {}  # each partition's latest node state, for the checkpoint
        self.resend_states: dict[int, Weights] = {}  # states a resumed run sends each node once
        self.privacy = dp.privacy(config)  # differential privacy: the accountant, Poisson sampling (fedplug.dp)
        self.poisson = dp.poisson(config)
        self.fold = fold_evaluation(config)  # evaluation with the next round's training (fedplug.folding)

    def run(
        self,
        arrays: ArrayRecord,
        first: int,
        last: int,
        failed_in_a_row: int = 0,
        node_states: dict[int, Weights] | None = None,
    ) -> ArrayRecord:
        """Run rounds ``first..last`` (round 0 only evaluates the initial model); return the final arrays.

        ``node_states``: the nodes' states of a resumed run (the ``node-state`` capability), sent once each.
        With ``fold-evaluation`` (``fedplug.folding``) a round's federated evaluation travels with the next
        round's training: the round's record is complete, saved and printed once that exchange is back.
        """
        self.node_states, self.resend_states = dict(node_states or {}), dict(node_states or {})
        dtypes = {name: array.dtype for name, array in from_record(arrays).items()}
        eval_every = int(self.config["eval-every"])
        self._last, self._started = last, time.monotonic()
        pending: _Pending | None = None  # the previous round, waiting for its folded evaluation
        for server_round in range(first, last + 1):
            if self.privacy is not None and server_round > 0 and not self.privacy.allows(server_round):
                log.warning("%s", self.privacy.stop_reason(server_round - 1))  # a resumed run: the budget is spent
                break
            record, started = RoundRecord(server_round), time.monotonic()
            self._started = started
            # evaluation (federated and centralized): round 0, every eval-every-th round and the last
            evaluated = server_round % eval_every == 0 or server_round == last
            if server_round > 0:
                # --- training: draw, configure, send and receive, screen, aggregate -------------
                try:
                    arrays, failed_in_a_row = self._train(
                        server_round, arrays, record, failed_in_a_row, dtypes, pending
                    )
                except RunFailed:  # keep the failed round's record (not its model) for the user
                    if pending is not None and not pending.closed:
                        self._close(pending, None)
                    record.unusable = self.discovery.take_unusable()
                    record.seconds = round(time.monotonic() - started, 3)
                    self.results.add_round(record.to_json())
                    raise
            pending = None
            # --- federated evaluation (not of the initial model): now, or with the next round's training
            if evaluated and server_round > 0 and self._folds(server_round, last):
                pending = self._open(server_round, arrays, record, failed_in_a_row, started)
                if pending is not None:
                    continue
            elif evaluated and server_round > 0:
                self._evaluate(server_round, arrays, record)
            if self._complete(server_round, arrays, record, failed_in_a_row, evaluated, started):
                break
        return arrays

    def _folds(self, server_round: int, last: int) -> bool:
        """Whether this round's evaluation may travel with the next round's training (``fedplug.folding``)."""
        if not self.fold or server_round >= last or self.sampling.fraction_train <= 0:
            return False
        return self.privacy is None or self.privacy.allows(server_round + 1)

    def _open(
        self, server_round: int, arrays: ArrayRecord, record: RoundRecord, failed: int, started: float
    ) -> _Pending | None:
        """Draw and configure this round's evaluation, to be sent with the next round's training; None if it draws
        no node (the round is then complete)."""
        drawn = self._draw(server_round, arrays, train=False)
        if drawn is None or not drawn[0].nodes:
            return None
        return _Pending(server_round, arrays, record, failed, *drawn, started=started)

    def _close(self, pending: _Pending, replies: dict[int, Message] | None) -> None:
        """Complete a round whose evaluation was folded: its replies, or None to send the evaluation alone now."""
        pending.closed = True
        pending.record.folded = replies is not None
        if replies is None:
            replies = self._send(pending.messages, [])[0]
        step = pending.step
        self._screen_all(pending.round, step, replies, pending.arrays, train=False)
        self._evaluated(pending.round, step, pending.record)
        # a folded round lasted until the next one began; its evaluation's time is the next round's
        until = self._started if pending.record.folded else None
        self._complete(pending.round, pending.arrays, pending.record, pending.failed, True, pending.started, until)

    def _complete(
        self,
        server_round: int,
        arrays: ArrayRecord,
        record: RoundRecord,
        failed_in_a_row: int,
        evaluated: bool,
        started: float,
        until: float | None = None,
    ) -> bool:
        """The round's centralized evaluation and privacy budget, then its checkpoint and results; whether the
        run stops (the privacy budget). Its ``seconds`` run from ``started`` to ``until`` (default: now)."""
        record.unusable = self.discovery.take_unusable()
        weights = from_record(arrays)
        record.centralized = (self.evaluate(server_round, weights) if evaluated else None) or {}
        stop = self._account(server_round, self._last, record)
        record.seconds = round((time.monotonic() if until is None else until) - started, 3)
        self._finish(server_round, weights, record, failed_in_a_row)
        return stop

    def _account(self, server_round: int, last: int, record: RoundRecord) -> bool:
        """Differential privacy: the budget spent after this round in its record; whether the next would exceed it."""
        if self.privacy is None:
            return False
        record.privacy = self.privacy.record(server_round)
        if server_round < last and not self.privacy.allows(server_round + 1):
            record.privacy["privacy-stop"] = self.privacy.stop_reason(server_round)
            log.warning("%s", record.privacy["privacy-stop"])
            return True
        return False

    def _finish(self, server_round: int, weights: Weights, record: RoundRecord, failed_in_a_row: int) -> None:
        """Checkpoint first (it carries the metrics), then the results files."""
        entry = record.to_json()
        rounds = [*self.results.rounds, entry]
        checkpoint.save(
            self.results.out,
            server_round,
            weights,
            self.strategy,
            rounds,
            node_states=self.node_states,
            failed_in_a_row=failed_in_a_row,
        )
        self.results.save_weights(weights)
        self.results.add_round(entry)

    def _train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        record: RoundRecord,
        failed_in_a_row: int,
        dtypes: dict[str, Any],
        pending: _Pending | None = None,
    ) -> tuple[ArrayRecord, int]:
        """The round's training step (with ``pending``'s folded evaluation): the new global model and the skipped
        rounds in a row."""
        step = self._exchange(server_round, arrays, train=True, pending=pending)
        if step is None:
            return arrays, failed_in_a_row
        record.train = step
        needed = max(1, min(self.sampling.min_train_nodes, len(step.partitions)))
        if len(step.replies) < needed:
            self._skip(server_round, record, step, needed, failed_in_a_row + 1)
            return arrays, failed_in_a_row + 1
        replies = step.replies if step.aggregate is None else [step.aggregate]
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        step.metrics = _loss_and_accuracy(metrics)
        if aggregated is None:
            return arrays, 0
        weights = from_record(aggregated)
        if not all_finite(weights):
            raise RunFailed(
                f"the global model became non-finite in round {server_round} ({self.config['strategy']}); "
                "lower lr or set clip-norm"
            )
        # server optimisers (FedAdam, FedYogi, ...) compute in float64: the global model keeps the model's dtypes
        return to_record({name: array.astype(dtypes[name], copy=False) for name, array in weights.items()}), 0

    def _skip(self, server_round: int, record: RoundRecord, step: Exchange, needed: int, in_a_row: int) -> None:
        """Record a round without enough good replies; stop the run if it cannot recover."""
        good = len(step.partitions) - len(step.failures)
        record.skipped = f"{good} good replies, {needed} needed" if step.partitions else "no node available"
        if step.failures and all(f["reason"].startswith(NON_FINITE) for f in step.failures):
            raise RunFailed(
                f"training diverged in round {server_round}: every node returned non-finite weights or metrics "
                f"(lr={self.config['lr']}); lower lr"
            )
        if in_a_row >= int(self.config["max-failed-rounds"]):
            reasons = sorted({f["reason"] for f in step.failures})
            raise RunFailed(
                f"no usable training result in {in_a_row} rounds in a row (last: round {server_round}): "
                + ("; ".join(reasons)[:400] or "no node replied")
            )
        log.warning("round %s skipped: %s", server_round, record.skipped)

    def _evaluate(self, server_round: int, arrays: ArrayRecord, record: RoundRecord) -> None:
        step = self._exchange(server_round, arrays, train=False)
        if step is not None:
            self._evaluated(server_round, step, record)

    def _evaluated(self, server_round: int, step: Exchange, record: RoundRecord) -> None:
        """An evaluation's screened replies into the round's record: the strategy's aggregate, personal metrics."""
        if not step.nodes:
            return
        record.evaluate = step
        if step.replies:
            step.metrics = _loss_and_accuracy(self.strategy.aggregate_evaluate(server_round, step.replies))
            record.personal = _personal_metrics(step)

    # -- one exchange ------------------------------------------------------------------

    def _draw(self, server_round: int, arrays: ArrayRecord, train: bool) -> tuple[Exchange, list[Message]] | None:
        """The step's drawn nodes and the strategy's messages to them; None if the step draws none."""
        if (self.sampling.fraction_train if train else self.sampling.fraction_evaluate) <= 0:
            return None
        step = Exchange(sample(self.discovery, self.sampling, self.seed, server_round, train, self.poisson))
        if self.discovery.first_call is not None and not self._marked:
            self.results.mark("first-client-call", self.discovery.first_call)
            self._marked = True
        if not step.nodes:
            return step, []
        configure = self.strategy.configure_train if train else self.strategy.configure_evaluate
        config = ConfigRecord({"lr": self.config["lr"]} if train else {})
        messages = list(configure(server_round, arrays, config, _DrawnNodes([info.node_id for info in step.nodes])))
        if self.resend_states:  # a resumed run gives each node its saved state (fedplug.capabilities): to evaluate
            partitions = {info.node_id: info.partition for info in step.nodes}  # its personal model, until it trains
            for message in messages:
                partition = partitions.get(message.metadata.dst_node_id, -1)
                state = self.resend_states.pop(partition, None) if train else self.resend_states.get(partition)
                if state is not None:  # its own content: Flower's strategies give every message the same one
                    message.content = RecordDict({**dict(message.content.items()), STATE_RECORD: to_record(state)})
        return step, messages

    def _exchange(
        self, server_round: int, arrays: ArrayRecord, train: bool, pending: _Pending | None = None
    ) -> Exchange | None:
        """Draw the step's nodes, send them the strategy's messages (with ``pending``'s folded evaluation), screen
        the replies; None if it draws none. ``pending``'s round is complete before this step's replies are read."""
        drawn = self._draw(server_round, arrays, train)
        if drawn is None or not drawn[0].nodes or (train and self.config["secagg"]):
            if pending is not None:  # nothing to fold it into: the evaluation alone
                self._close(pending, None)
            if drawn is None or not drawn[0].nodes:
                return None if drawn is None else drawn[0]
            return self._secure(drawn[0], server_round, drawn[1])
        step, messages = drawn
        replies, evaluated = self._send(messages, pending.messages if pending is not None else [])
        if pending is not None:
            self._close(pending, evaluated)
        self._screen_all(server_round, step, replies, arrays, train)
        return step

    def _send(
        self, messages: list[Message], evaluations: list[Message]
    ) -> tuple[dict[int, Message], dict[int, Message]]:
        """One exchange: the messages' replies and the folded evaluations' replies, each by node id."""
        if isinstance(self.discovery, Cohorts):  # one message per cohort, one reply per client
            return self.discovery.exchange(messages, self.timeout, evaluations)
        return folding.exchange(self.grid, messages, evaluations, self.timeout)

    def _screen_all(
        self, server_round: int, step: Exchange, replies: dict[int, Message], arrays: ArrayRecord, train: bool
    ) -> None:
        """Screen each drawn node's reply into the step: good replies, failures and why, node states."""
        step.node_seconds = [_node_timing(reply)[1] for reply in replies.values()]
        reference = from_record(arrays) if train else {}
        good: list[tuple[int, Message]] = []
        norms: dict[int, float] = {}  # each accepted update's norm, taken while screening decoded it
        for info in step.nodes:
            reply = replies.get(info.node_id)
            reason = self._screen(reply, info, reference, train, norms)
            if reason is None:
                assert reply is not None
                state = take_state(reply.content) if train else None  # the strategy never sees a node's state
                if state is not None:
                    self.node_states[info.partition] = state
                good.append((info.partition, reply))
            else:
                step.failures.append({"partition": info.partition, "reason": reason})
                log.warning(
                    "round %s: %s on partition %s failed: %s",
                    server_round,
                    "train" if train else "evaluate",
                    info.partition,
                    reason,
                )
        if train and float(self.config["outlier-factor"]) > 0:
            good = self._drop_outliers(good, norms, step.failures)
        step.replies = [reply for _, reply in good]

    def _secure(self, step: Exchange, server_round: int, messages: list[Message]) -> Exchange:
        """secagg=true: the train exchange as SecAgg+ (``fedplug.secagg``); the strategy gets one reply, the mean."""
        by_node = {info.node_id: info for info in step.nodes}
        examples = {node: info.train_examples for node, info in by_node.items()}
        outcome = secagg.secure_train(self.grid, messages, examples, self.config, server_round, self.timeout)
        step.failures = [
            {"partition": by_node[node].partition, "reason": reason} for node, reason in outcome.failures.items()
        ]
        step.failures.sort(key=lambda failure: failure["partition"])
        for failure in step.failures:
            log.warning("round %s: secagg on partition %s failed: %s", server_round, *failure.values())
        step.replies, step.aggregate = outcome.survivors, outcome.aggregate
        step.node_seconds = [_node_timing(reply)[1] for reply in outcome.survivors]
        return step

    def _drop_outliers(
        self, good: list[tuple[int, Message]], by_partition: dict[int, float], failures: list[dict[str, Any]]
    ) -> list[tuple[int, Message]]:
        """Refuse updates whose norm is ``outlier-factor`` times the round's median update norm or more."""
        if len(good) < 3:
            return good
        norms = [by_partition[partition] for partition, _ in good]
        limit = float(self.config["outlier-factor"]) * float(np.median(norms))
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

    def _screen(
        self, reply: Message | None, info: NodeInfo, reference: Weights, train: bool, norms: dict[int, float]
    ) -> str | None:
        """Why a reply is refused, or None; clips an accepted update to ``clip-norm``; its norm into ``norms``."""
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
        if len(content.array_records) != 1 and not self.descriptor.needs:
            return "reply must carry one ArrayRecord of weights"
        problem = reply_problem(content, self.descriptor)  # the strategy's extra records (fedplug.capabilities)
        if problem:
            return problem
        key, record = next(iter(content.array_records.items()))
        try:
            weights = from_record(record)
        except Exception as error:  # a record that does not even decode
            return f"unreadable weights: {error}"
        reason = check_weights(weights, reference)
        clip_norm = float(self.config["clip-norm"])
        if reason is None and clip_norm > 0:
            clipped = clip_update(weights, reference, clip_norm)
            if clipped is not weights:
                content[key] = to_record(clipped)
                weights = from_record(cast(ArrayRecord, content[key]))  # the update as the strategy will read it
        if reason is None:
            norms[info.partition] = update_norm(weights, reference)
        return reason


def _personal_metrics(step: Exchange) -> dict[str, Any]:
    """The personal models' evaluation (``fedplug.personal``): example-weighted ``personal-loss`` and
    ``personal-accuracy``, and each partition's ``personal-accuracy``; empty when the replies carry none."""
    failed = {failure["partition"] for failure in step.failures}
    partitions = [partition for partition in step.partitions if partition not in failed]
    rows: list[tuple[int, float, float, float]] = []
    for partition, reply in zip(partitions, step.replies):
        metrics = next(iter(reply.content.metric_records.values()))
        if "personal-accuracy" not in metrics or "personal-loss" not in metrics:
            return {}
        values = [cast(float, metrics[key]) for key in (NUM_EXAMPLES, "personal-loss", "personal-accuracy")]
        rows.append((partition, float(values[0]), float(values[1]), float(values[2])))
    if not rows:
        return {}
    examples = sum(row[1] for row in rows)
    return {
        "personal-loss": sum(row[1] * row[2] for row in rows) / examples,
        "personal-accuracy": sum(row[1] * row[3] for row in rows) / examples,
        "personal-accuracy-per-node": {str(row[0]): row[3] for row in rows},
    }


def _loss_and_accuracy(metrics: Any) -> dict[str, float]:
    """The aggregated loss and accuracy a round records, in the strategy's order."""
    return {k: float(v) for k, v in (metrics or {}).items() if k in ("loss", "accuracy")}


def resume(out: Path, strategy: Any) -> Resumed | None:
    """Restore the strategy from ``out``'s newest checkpoint; where the run stands, or None without one."""
    saved = checkpoint.latest(out)
    if saved is None:
        return None
    checkpoint.restore_strategy(strategy, saved.strategy["layout"], saved.strategy["arrays"])
    failed = int(saved.extra.get("failed_in_a_row", 0))
    return Resumed(saved.round, saved.weights, saved.rounds, failed, saved.node_states)
