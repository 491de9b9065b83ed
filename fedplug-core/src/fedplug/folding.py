"""Folding a round's evaluation into the next round's training exchange (``fold-evaluation``).

Round ``r``'s federated evaluation and round ``r + 1``'s training start from the same global
model, the one round ``r``'s training produced. Sent one after the other they cost two
exchanges a round, and each exchange pays the engine's fixed waits: the Simulation Engine's
0.1 s pollers, and on the Deployment Engine an idle SuperNode's 3 s sleep and a new ClientApp
process per message. So the round loop (``fedplug.rounds``) sends both in one exchange:

- a node drawn for both gets **one** train message carrying the evaluation's records as well,
  under :data:`PREFIX` (its arrays are the training's, sent once; :data:`FOLD_RECORD` names
  them). The node evaluates the model it received, then trains it (:func:`parts` splits what
  it received), and replies with both results, the evaluation's again under :data:`PREFIX`;
- a node drawn for only one of them gets that message, unchanged, in the same exchange;
- the loop splits each reply in two (:func:`unfold`, :func:`reply`): the strategy sees a train
  reply and an evaluate reply as if they had come apart, and each is screened on its own.

Inside a folded reply a failed step is an ``error`` record (``{"code", "reason"}``), so a node
whose training raised still reports its evaluation, and the other way round. The strategy
decides whether it may be folded: it declares ``"fold"`` in ``fedplug.Strategy.composes`` when
its ``configure_train`` does not depend on the previous ``aggregate_evaluate`` (every built-in).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

PREFIX = "evaluate:"
"""The evaluation's records inside a folded message or reply."""
FOLD_RECORD = "evaluate:fedplug.arrays"
"""In a folded message: the names of the training's ArrayRecords the evaluation uses."""
ERROR_RECORD = "error"
"""A failed step inside a folded or cohort reply: a ConfigRecord ``{"code", "reason"}``."""


def merged(train: RecordDict, evaluate: RecordDict) -> RecordDict | None:
    """The train message's content with the evaluation's records added; None when the evaluation's
    arrays are not the training's (the two then travel as two messages)."""
    arrays = {key: record for key, record in evaluate.items() if isinstance(record, ArrayRecord)}
    for key, record in arrays.items():
        sent = train.get(key)
        if not isinstance(sent, ArrayRecord) or (sent is not record and sent.object_id != record.object_id):
            return None
    content = RecordDict(dict(train.items()))
    for key, other in evaluate.items():
        if key not in arrays:
            content[PREFIX + key] = other
    content[FOLD_RECORD] = ConfigRecord({"names": list(arrays)})
    return content


def parts(content: RecordDict) -> tuple[RecordDict, RecordDict | None]:
    """A received message's training content and, if it is folded, its evaluation's content."""
    if FOLD_RECORD not in content:
        return content, None
    train = RecordDict({key: record for key, record in content.items() if not key.startswith(PREFIX)})
    names = cast(list[str], cast(ConfigRecord, content[FOLD_RECORD])["names"])
    evaluate = RecordDict({name: train[name] for name in names})
    for key, record in content.items():
        if key.startswith(PREFIX) and key != FOLD_RECORD:
            evaluate[key[len(PREFIX) :]] = record
    return train, evaluate


def error_record(code: int, reason: str) -> ConfigRecord:
    """A failed step's :data:`ERROR_RECORD`."""
    return ConfigRecord({"code": code, "reason": reason})


def unfold(records: Iterable[tuple[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A folded reply's records: the training's and the evaluation's (without :data:`PREFIX`)."""
    train: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    for key, record in records:
        if key.startswith(PREFIX):
            evaluate[key[len(PREFIX) :]] = record
        else:
            train[key] = record
    return train, evaluate


def reply(records: Mapping[str, Any], to: Message) -> Message:
    """The reply to ``to`` made of ``records``: Flower's error reply if they hold :data:`ERROR_RECORD`."""
    failed = records.get(ERROR_RECORD)
    if isinstance(failed, ConfigRecord):
        return Message(Error(int(cast(int, failed["code"])), str(failed["reason"])), reply_to=to)
    return Message(RecordDict(dict(records)), reply_to=to)


def exchange(
    grid: Grid, messages: list[Message], evaluations: list[Message], timeout: float
) -> tuple[dict[int, Message], dict[int, Message]]:
    """Send a step's messages and a previous round's evaluation messages as one exchange, folding a node's two
    into one where they share the model; each step's replies by node id."""
    waiting = {message.metadata.dst_node_id: message for message in evaluations}
    sent: list[tuple[Message, Message | None, Message | None]] = []  # (sent, the step's, the evaluation's)
    for message in messages:
        node = message.metadata.dst_node_id
        evaluation = waiting.get(node)
        content = None if evaluation is None else merged(message.content, evaluation.content)
        if content is None or message.metadata.message_type != MessageType.TRAIN:
            sent.append((message, message, None))
            continue
        del waiting[node]
        sent.append((Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN), message, evaluation))
    sent += [(evaluation, None, evaluation) for evaluation in waiting.values()]
    answers = grid.send_and_receive([message for message, _, _ in sent], timeout=timeout)
    # by the message each reply answers (Flower gives a message its id when it is sent): an error the SuperLink
    # gives for a node (e.g. it is unreachable) comes from the SuperLink's own node id, not the node's
    to = {message.metadata.message_id: (own, evaluation) for message, own, evaluation in sent}
    step: dict[int, Message] = {}
    evaluated: dict[int, Message] = {}
    for answer in answers:
        own, evaluation = to.get(answer.metadata.reply_to_message_id, (None, None))
        if own is not None and evaluation is not None:  # a folded message: its reply split in two
            if answer.has_error():  # failed as a whole: both steps with its error
                step[own.metadata.dst_node_id] = Message(answer.error, reply_to=own)
                evaluated[evaluation.metadata.dst_node_id] = Message(answer.error, reply_to=evaluation)
                continue
            train_records, evaluate_records = unfold(answer.content.items())
            step[own.metadata.dst_node_id] = reply(train_records, own)
            evaluated[evaluation.metadata.dst_node_id] = reply(evaluate_records, evaluation)
        elif own is not None:
            step[own.metadata.dst_node_id] = answer
        elif evaluation is not None:
            evaluated[evaluation.metadata.dst_node_id] = answer
    return step, evaluated
