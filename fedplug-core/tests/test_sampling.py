"""Each round's nodes depend only on the seed, the round and the population, never on when nodes answer.

A fake Grid in this process whose nodes join and answer fedplug's discovery query over
several seconds, in different orders; the discovery and the draw are fedplug's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fedplug.rounds import NODE_RECORD, TIMING_RECORD, Discovery, RunFailed, draw, sample
from fedplug.strategies import Sampling

pytestmark = pytest.mark.fast

SEED = 5
TEN_PERCENT = Sampling(fraction_train=0.1, fraction_evaluate=0.1, min_train_nodes=2, min_evaluate_nodes=2,
                       min_available_nodes=2)  # fmt: skip


@dataclass
class Node:
    partition: int
    partitions: int  # num-partitions it declares (0: a deployed node with its own data)
    joins: float = 0.0  # seconds after the start when the SuperLink lists it
    answers: float = 0.0  # seconds its answer to the query takes (inf: never)
    error: str = ""  # the reason of its error reply, if it cannot take part


class Reply:
    """A node's answer to the query, as the Grid's ``pull_messages`` returns it."""

    def __init__(self, node_id: int, message_id: str, node: Node) -> None:
        self.metadata = SimpleNamespace(src_node_id=node_id, reply_to_message_id=message_id)
        self.error = SimpleNamespace(reason=node.error, code=0)
        self.content: dict[str, Any] = {
            NODE_RECORD: {
                "partition-id": node.partition,
                "num-partitions": node.partitions,
                "backend": "numpy",
                "train-examples": 100,
                "test-examples": 20,
            },
            TIMING_RECORD: {"called": time.time(), "seconds": 0.001},
        }
        self._error = bool(node.error)

    def has_error(self) -> bool:
        return self._error


class SlowGrid:
    """A Grid whose nodes join and answer at their own times; it counts the queries each node gets."""

    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes, self.started = nodes, time.monotonic()
        self.sent: dict[str, tuple[int, float]] = {}
        self.queries = dict.fromkeys(nodes, 0)

    def now(self) -> float:
        return time.monotonic() - self.started

    def get_node_ids(self) -> list[int]:
        return [node_id for node_id, node in self.nodes.items() if node.joins <= self.now()]

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"query-{sum(self.queries.values())}"
            self.sent[message_id] = (message.dst_node_id, self.now())
            self.queries[message.dst_node_id] += 1
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Reply]:
        replies = []
        for message_id in message_ids:
            node_id, sent = self.sent[message_id]
            if self.now() >= sent + self.nodes[node_id].answers:
                replies.append(Reply(node_id, message_id, self.nodes[node_id]))
                del self.sent[message_id]
        return replies


def query(node_id: int) -> Any:
    return SimpleNamespace(dst_node_id=node_id)


def federation(size: int, schedule: str) -> dict[int, Node]:
    """``size`` partitioned nodes with random node ids, joining and answering as ``schedule`` says."""
    rng = np.random.default_rng(0)
    node_ids = rng.choice(2**62, size=size, replace=False)
    nodes = {}
    for partition, node_id in enumerate(node_ids):
        if schedule == "at once":
            joins, answers = 0.0, 0.0
        elif schedule == "random":  # over about 3.5 s, in no order
            joins, answers = float(rng.uniform(0, 1.5)), float(rng.uniform(0, 2))
        else:  # the highest partitions first, the lowest 4 s later
            joins, answers = 0.0, 4.0 * partition / size
        nodes[int(node_id)] = Node(partition, size, joins, answers)
    return nodes


def rounds(discovery: Discovery, sampling: Sampling, count: int = 3) -> list[tuple[list[int], list[int]]]:
    """Each round's (train, evaluate) partitions, as the round loop samples them."""
    drawn = []
    for server_round in range(1, count + 1):
        train = [info.partition for info in sample(discovery, sampling, SEED, server_round, train=True)]
        evaluate = [info.partition for info in sample(discovery, sampling, SEED, server_round, train=False)]
        drawn.append((train, evaluate))
    return drawn


def test_the_sample_does_not_depend_on_when_nodes_answer() -> None:
    size = 500
    expected = [
        (draw(list(range(size)), 0.1, 2, SEED, r, 0), draw(list(range(size)), 0.1, 2, SEED, r, 1)) for r in (1, 2, 3)
    ]
    assert all(len(train) == len(evaluate) == 50 for train, evaluate in expected)  # 10% of 500 for both
    for schedule in ("at once", "random", "highest first"):
        grid = SlowGrid(federation(size, schedule))
        started = time.monotonic()
        assert rounds(Discovery(grid, wait=60.0, query=query), TEN_PERCENT) == expected, schedule
        if schedule != "at once":
            assert time.monotonic() - started > 3.0  # the answers did arrive over several seconds
        assert set(grid.queries.values()) == {1}  # one query per node, never sent again


def test_unusable_and_silent_nodes_leave_the_population_with_their_reasons() -> None:
    nodes = federation(40, "at once")
    by_partition = {node.partition: node_id for node_id, node in nodes.items()}
    nodes[by_partition[7]].error = "query raised UnknownBackend: unknown backend 'mlx'"
    nodes[by_partition[8]].answers = float("inf")
    nodes[by_partition[9]].partition = 10  # two nodes claim partition 10: the one with the lower node id keeps it
    discovery = Discovery(SlowGrid(nodes), wait=1.0, query=query)
    population = [p for p in range(40) if p not in (7, 8, 9)]
    assert discovery.population(2) == population
    half = Sampling(0.5, 0.5, 2, 2, 2)
    assert rounds(discovery, half, 2) == [
        (draw(population, 0.5, 2, SEED, r, 0), draw(population, 0.5, 2, SEED, r, 1)) for r in (1, 2)
    ]
    reasons = {entry["node"]: entry["reason"] for entry in discovery.take_unusable()}
    assert reasons[by_partition[7]] == "query raised UnknownBackend: unknown backend 'mlx'"
    assert reasons[by_partition[8]] == "no answer to the discovery query within 1 s"
    loser = max(by_partition[9], by_partition[10])
    assert reasons[loser] == f"declares partition 10, which node {min(by_partition[9], by_partition[10])} holds"
    assert len(reasons) == 3 and discovery.take_unusable() == []  # each is reported once


def test_nodes_with_their_own_data_are_drawn_from_those_that_joined() -> None:
    # deployed nodes with their own data: partition = node id, num-partitions 0; two join late
    nodes = {node_id: Node(node_id, 0, joins=0.0 if node_id < 6 else 2.0) for node_id in range(10)}
    discovery = Discovery(SlowGrid(nodes), wait=30.0, query=query)
    half = Sampling(0.5, 0.5, 2, 2, 6)
    assert discovery.population(6) == list(range(6))  # min-available-nodes 6 have joined: no wait for more
    assert [p.partition for p in sample(discovery, half, SEED, 1, True)] == draw(list(range(6)), 0.5, 2, SEED, 1, 0)
    time.sleep(2.0)
    assert discovery.population(6) == list(range(10))  # the population of a later round has the late ones


def test_a_federation_where_no_node_can_take_part_stops_with_the_reasons() -> None:
    nodes = federation(3, "at once")
    for node in nodes.values():
        node.error = "query raised DataError: no such file"
    with pytest.raises(RunFailed, match="no node can take part: query raised DataError: no such file"):
        Discovery(SlowGrid(nodes), wait=30.0, query=query).population(2)


def test_a_node_whose_query_failed_is_asked_again_with_exponential_backoff_in_rounds() -> None:
    """Queried in round 1, then 2, 4, 8, 16 while it fails (never twice a round); usable from its first good answer."""
    nodes = federation(4, "at once")
    flaky = next(node_id for node_id, node in nodes.items() if node.partition == 2)
    reason = "query raised DataError: data /data/digits.parquet does not exist"
    nodes[flaky].error = reason
    grid = SlowGrid(nodes)
    discovery = Discovery(grid, wait=30.0, query=query)
    everyone = Sampling(1.0, 1.0, 2, 2, 2)
    asked_in, drawn, reported = [], {}, {}
    for server_round in range(1, 21):
        before = grid.queries[flaky]
        drawn[server_round] = [info.partition for info in sample(discovery, everyone, SEED, server_round, train=True)]
        drawn[server_round] += [info.partition for info in sample(discovery, everyone, SEED, server_round, False)]
        asked_in += [server_round] * (grid.queries[flaky] - before)
        reported[server_round] = discovery.take_unusable()
        if server_round == 10:  # its operator fixed the data: the next query (round 16) finds it
            nodes[flaky].error = ""
    assert asked_in == [1, 2, 4, 8, 16], asked_in
    assert all(drawn[r] == [0, 1, 3, 0, 1, 3] for r in range(1, 16)), drawn
    assert all(drawn[r] == [0, 1, 2, 3, 0, 1, 2, 3] for r in range(16, 21)), drawn
    assert reported[1] == [
        {"node": flaky, "reason": "query raised DataError: data /data/digits.parquet does not exist"}
    ]
    assert not any(reported[r] for r in range(2, 21)), reported  # reported once, in the round it was found
    assert {node: count for node, count in grid.queries.items() if node != flaky} == dict.fromkeys(
        [node for node in nodes if node != flaky], 1
    )


def one_failing(partition: int) -> tuple[dict[int, Node], int, SlowGrid]:
    """Three partitioned nodes, the one of ``partition`` answering the query with an error; their Grid."""
    nodes = federation(3, "at once")
    failing = next(node_id for node_id, node in nodes.items() if node.partition == partition)
    nodes[failing].error = "query raised RuntimeError: node unavailable"
    return nodes, failing, SlowGrid(nodes)


def test_the_backoff_reaches_its_longest_gap_and_a_silent_node_holds_a_round_retry_wait_at_most() -> None:
    nodes, failing, grid = one_failing(0)
    discovery = Discovery(grid, wait=60.0, query=query, retry_wait=0.5)
    asked_in, seconds = [], {}
    for server_round in range(1, 81):
        if server_round == 64:  # from now on it is silent: its query of round 64 is never answered
            nodes[failing].answers = float("inf")
        before, started = grid.queries[failing], time.monotonic()
        assert discovery.population(2, server_round) == [1, 2]
        seconds[server_round] = time.monotonic() - started
        asked_in += [server_round] * (grid.queries[failing] - before)
    assert asked_in == [1, 2, 4, 8, 16, 32, 48, 64], asked_in  # gaps 1, 2, 4, 8, 16, then at most 16
    assert 0.5 <= seconds[64] < 5.0, seconds[64]  # retry_wait, not wait
    assert max(seconds[r] for r in range(65, 81)) < 0.5  # an unanswered query is not asked again nor waited for


def test_a_failed_node_that_the_grid_no_longer_lists_is_asked_again_once_it_is_listed_again() -> None:
    nodes, gone, grid = one_failing(1)
    discovery = Discovery(grid, wait=60.0, query=query, retry_wait=30.0)
    asked_in, seconds = [], []
    for server_round in range(1, 9):
        nodes[gone].joins = float("inf") if 3 <= server_round <= 5 else 0.0  # its SuperNode is away in rounds 3-5
        before, started = grid.queries[gone], time.monotonic()
        assert discovery.population(2, server_round) == [0, 2]
        seconds.append(time.monotonic() - started)
        asked_in += [server_round] * (grid.queries[gone] - before)
    assert asked_in == [1, 2, 6], asked_in  # due in round 4, but not listed then: asked when it is back
    assert max(seconds) < 5.0, seconds  # never waited for a query it could not get
