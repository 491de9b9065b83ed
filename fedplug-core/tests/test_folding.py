"""fold-evaluation (``fedplug.folding``): a round's evaluation travels with the next round's training.

The exchange is driven over an in-process Grid whose nodes are fedplug's real ClientApp (numpy backend): a node
drawn for both steps gets one message and its reply is split in two, each identical to what the two messages sent
apart would have brought back; a node whose training raises still reports its evaluation. End-to-end (the same
bits as an unfolded run, on the cohort path and with one node per client): ``test_cohorts.py``,
``test_reproducible.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedplug import flower_adapter, folding
from fedplug.apps import client_app
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.records import from_record, to_record

pytestmark = pytest.mark.fast
NODES = 4


class ClientAppGrid:
    """A Grid whose nodes are fedplug's ClientApp in this process; it keeps the messages it was given."""

    def __init__(self) -> None:
        config = resolve(NumpyBackend(), {"num-supernodes": NODES, "hidden-dims": "8"})
        self.contexts = {
            node: Context(1, node, {"partition-id": node - 1, "num-partitions": NODES}, RecordDict(), config)
            for node in range(1, NODES + 1)
        }
        self.sent: list[Message] = []

    def send_and_receive(self, messages: list[Message], *, timeout: float) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            sent = f"m{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = sent  # as Flower's Grids do when they push a message
            node, kind = message.metadata.dst_node_id, message.metadata.message_type
            delivered = flower_adapter.message_for_client_app(
                message.content, message_type=kind, run_id=1, message_id=sent, dst_node_id=node, group_id="1"
            )
            replies.append(client_app(delivered, self.contexts[node]))
        return replies


def _model() -> ArrayRecord:
    rng = np.random.default_rng(0)
    shapes = {"layers.0.weight": (8, 784), "layers.0.bias": (8,), "layers.1.weight": (10, 8), "layers.1.bias": (10,)}
    return to_record({name: rng.normal(0, 0.1, shape).astype(np.float32) for name, shape in shapes.items()})


def _messages(arrays: ArrayRecord, nodes: list[int], kind: str, config: dict[str, Any]) -> list[Message]:
    return [
        Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), dst_node_id=node, message_type=kind)
        for node in nodes
    ]


def _result(reply: Message) -> Any:
    """What the round loop reads from a reply: its error, or its metrics and weights."""
    if reply.has_error():
        return reply.error.reason
    metrics = {k: v for k, v in reply.content["metrics"].items()}  # type: ignore[union-attr]
    arrays = reply.content.get("arrays")
    return metrics, None if arrays is None else {k: v.tolist() for k, v in from_record(arrays).items()}  # type: ignore[arg-type]


def test_a_folded_exchange_brings_back_what_two_exchanges_would() -> None:
    arrays, broken = _model(), {"lr": 0.1, "local-epochs": "x"}  # node 3's training raises, its evaluation does not
    with flower_adapter.server_app_identity(run_id=1):
        train = _messages(arrays, [1, 2], MessageType.TRAIN, {"lr": 0.1}) + _messages(arrays, [3], "train", broken)
        evaluate = _messages(arrays, [2, 3, 4], MessageType.EVALUATE, {})
        folded = ClientAppGrid()
        trained, evaluated = folding.exchange(folded, train, evaluate, timeout=10)  # type: ignore[arg-type]
        train = _messages(arrays, [1, 2], MessageType.TRAIN, {"lr": 0.1}) + _messages(arrays, [3], "train", broken)
        evaluate = _messages(arrays, [2, 3, 4], MessageType.EVALUATE, {})
        apart = ClientAppGrid()
        alone = folding.exchange(apart, train, [], timeout=10)[0], folding.exchange(apart, evaluate, [], timeout=10)[0]
    # one message per node: nodes 2 and 3 got their training and evaluation in one
    assert [(m.metadata.dst_node_id, m.metadata.message_type) for m in folded.sent] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "evaluate")
    ]  # fmt: skip
    assert [folding.FOLD_RECORD in m.content for m in folded.sent] == [False, True, True, False]
    assert sorted(trained) == [1, 2, 3] and sorted(evaluated) == [2, 3, 4]
    for node in (1, 2, 3):
        assert _result(trained[node]) == _result(alone[0][node])
    for node in (2, 3, 4):
        assert _result(evaluated[node]) == _result(alone[1][node])
    assert "train raised ValueError" in _result(trained[3])  # its evaluation came back all the same
    assert _result(evaluated[3])[0]["accuracy"] == _result(alone[1][3])[0]["accuracy"]
    # the replies answer the strategy's own messages, as if they had come apart
    assert [trained[node].metadata.message_type for node in (1, 2, 3)] == ["train"] * 3
    assert [evaluated[node].metadata.message_type for node in (2, 3, 4)] == ["evaluate"] * 3


def test_a_message_carries_the_evaluation_only_with_the_trainings_model() -> None:
    arrays, other = _model(), _model()
    train = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})})
    content = folding.merged(train, RecordDict({"arrays": arrays, "config": ConfigRecord({"x": 1})}))
    assert content is not None
    received, evaluation = folding.parts(content)
    assert list(received.keys()) == ["arrays", "config"] and dict(received["config"]) == {"lr": 0.1}  # type: ignore[arg-type]
    assert evaluation is not None and evaluation["arrays"] is arrays and dict(evaluation["config"]) == {"x": 1}  # type: ignore[arg-type]
    # equal models in two records still fold (Flower's DP wrappers copy them); different ones never do
    assert folding.merged(train, RecordDict({"arrays": ArrayRecord(dict(other.items()))})) is not None
    changed = to_record({k: v + 1 for k, v in from_record(arrays).items()})
    assert folding.merged(train, RecordDict({"arrays": changed})) is None
    assert folding.merged(train, RecordDict({"weights": arrays})) is None
    assert folding.parts(train) == (train, None)
