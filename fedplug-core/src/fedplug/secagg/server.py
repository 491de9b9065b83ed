"""SecAgg+ on the server: the train step as fedplug's round loop (``fedplug.rounds``) runs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedplug import flower_adapter
from fedplug.backend import Config, Weights
from fedplug.records import from_record, to_record
from fedplug.secagg.primitives import (
    COLLECT,
    MASKED,
    RECORD,
    SETUP,
    SHARE,
    UNMASK,
    Settings,
    _derive,
    _flatten,
    _mask,
    _unflatten,
    neighbours,
)
from fedplug.validation import check_metrics


@dataclass
class Outcome:
    """What the protocol gives the round loop."""

    aggregate: Message | None = None
    """One reply carrying the survivors' weighted mean model and their summed example count (None: no result)."""
    survivors: list[Message] = field(default_factory=list)
    """The masked replies that went into the sum."""
    failures: dict[int, str] = field(default_factory=dict)
    """Why each drawn node (by node id) is not in the sum."""


class _Protocol:
    def __init__(
        self, grid: Any, settings: Settings, config: Config, server_round: int, timeout: float, outcome: Outcome
    ) -> None:
        self.grid, self.settings, self.config, self.round = grid, settings, config, server_round
        self.timeout, self.outcome = timeout, outcome

    def exchange(self, stage: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        """Send one stage's messages, return the good replies by node; the others are failures of their nodes."""
        messages = [
            Message(content=content, dst_node_id=node, message_type=f"train.{stage}", group_id=str(self.round))
            for node, content in contents.items()
        ]
        replies = {
            reply.metadata.src_node_id: reply for reply in self.grid.send_and_receive(messages, timeout=self.timeout)
        }
        good = {}
        for node in contents:
            reply = replies.get(node)
            if reply is None:
                self.outcome.failures[node] = f"{stage}: no reply within round-timeout ({self.timeout:g} s)"
            elif reply.has_error():
                self.outcome.failures[node] = f"{stage}: " + " ".join(str(reply.error.reason).split())[:300]
            else:
                good[node] = reply
        return good

    def record(self, **values: Any) -> RecordDict:
        return RecordDict({RECORD: ConfigRecord({"round": self.round, **values})})


def secure_train(
    grid: Any,
    messages: list[Message],
    examples: Mapping[int, int],
    config: Config,
    server_round: int,
    timeout: float,
) -> Outcome:
    """Run the round's train step as SecAgg+ on the strategy's ``messages``; ``examples``: each node's train size."""
    settings, outcome = Settings.from_config(config), Outcome()
    protocol = _Protocol(grid, settings, config, server_round, timeout, outcome)
    train = {message.metadata.dst_node_id: message for message in messages}
    drawn = sorted(train)
    keys = protocol.exchange(SETUP, {node: protocol.record() for node in drawn})  # nodes quantise by their config
    if len(drawn) * settings.quantization_range >= settings.modulus:  # the sum must not wrap around
        return _give_up(
            outcome,
            drawn,
            f"{len(drawn)} nodes x secagg.quantization-range reach secagg.modulus-range; lower the range",
        )
    graph = neighbours(sorted(keys), settings.num_shares)
    group = min((len(nodes) for nodes in graph.values()), default=0)
    threshold = settings.threshold_for(group)
    if group < threshold or len(keys) < 2:
        return _give_up(outcome, drawn, f"{len(keys)} nodes set up, too few for reconstruction-threshold {threshold}")
    public = {node: reply.content.config_records[RECORD] for node, reply in keys.items()}
    shared = protocol.exchange(
        SHARE,
        {
            node: protocol.record(
                nodes=graph[node],
                threshold=threshold,
                **{
                    "mask-publics": [public[peer]["mask-public"] for peer in graph[node]],
                    "share-publics": [public[peer]["share-public"] for peer in graph[node]],
                },
            )
            for node in graph
        },
    )
    if len(shared) < threshold:
        return _give_up(outcome, drawn, f"{len(shared)} nodes shared keys, reconstruction-threshold is {threshold}")
    inbox: dict[int, list[tuple[int, bytes]]] = {node: [] for node in shared}
    for node, reply in shared.items():
        sent = reply.content.config_records[RECORD]
        for dst, ciphertext in zip(cast(list[int], sent["destinations"]), cast(list[bytes], sent["ciphertexts"])):
            if int(dst) in inbox:
                inbox[int(dst)].append((node, ciphertext))
    # central DP (dp=client-fixed): every node clips and sends its update with weight 1 (the nodes decide that
    # by their own run config); the aggregate reply then carries the SUM for fedplug.dp.FixedDenominator
    central = settings.dp == "client-fixed"
    scale = max(examples[node] for node in shared) if shared else 1
    collect = {}
    for node in shared:
        content = RecordDict(dict(train[node].content.items()))
        content[RECORD] = ConfigRecord(
            {
                "round": server_round,
                "senders": [src for src, _ in inbox[node]],
                "ciphertexts": [ciphertext for _, ciphertext in inbox[node]],
                "weight": 1.0 if central else examples[node] / scale,
                "clip-norm": float(config["clip-norm"]),
                "rounding-seed": int(
                    np.random.SeedSequence([int(config["seed"]), server_round, node]).generate_state(1)[0]
                ),
            }
        )
        collect[node] = content
    masked = protocol.exchange(COLLECT, collect)
    size = sum(
        array.size for array in from_record(cast(ArrayRecord, next(iter(train.values())).content["arrays"])).values()
    )
    for node, reply in list(masked.items()):
        reason = _screen(reply, examples[node], size)
        if reason is not None:
            outcome.failures[node] = f"{COLLECT}: {reason}"
            del masked[node]
    if len(masked) < threshold:
        return _give_up(outcome, drawn, f"{len(masked)} masked vectors, reconstruction-threshold is {threshold}")
    dropped = sorted(set(shared) - set(masked))
    unmasked = protocol.exchange(
        UNMASK,
        {
            node: protocol.record(
                active=[peer for peer in graph[node] if peer in masked],
                dropped=[peer for peer in graph[node] if peer in dropped],
            )
            for node in masked
        },
    )
    try:
        total = _unmask(masked, unmasked, dropped, graph, public, threshold, settings, server_round, size)
    except ValueError as error:
        return _give_up(outcome, sorted(masked), str(error))
    reference = from_record(cast(ArrayRecord, next(iter(train.values())).content["arrays"]))
    names = list(reference)
    outcome.survivors = [masked[node] for node in sorted(masked)]
    if central:  # global + the sum of the clipped updates: the DP wrapper divides by the expected count, adds noise
        arrays = _unflatten(_flatten(reference, names) + total, reference)
    else:  # the survivors' weighted mean, with their summed example count: FedAvg's arithmetic gives it back
        weight_sum = sum(examples[node] / scale for node in masked)
        arrays = _unflatten(_flatten(reference, names) + total / weight_sum, reference)
    outcome.aggregate = _aggregate_reply(outcome.survivors, arrays, examples, masked, weighted=not central)
    return outcome


def _screen(reply: Message, examples: int, size: int) -> str | None:
    content = reply.content
    if MASKED not in content.array_records or len(content.metric_records) != 1:
        return "reply must carry a masked vector and one MetricRecord"
    reason = check_metrics(next(iter(content.metric_records.values())), examples)
    if reason is not None:
        return reason
    vector = content.array_records[MASKED]["vector"].numpy()
    return None if vector.shape == (size,) else f"masked vector of shape {vector.shape}, expected ({size},)"


def _give_up(outcome: Outcome, nodes: list[int], reason: str) -> Outcome:
    for node in nodes:
        outcome.failures.setdefault(node, f"secagg: {reason}")
    return outcome


def _unmask(
    masked: dict[int, Message],
    unmasked: dict[int, Message],
    dropped: list[int],
    graph: dict[int, list[int]],
    public: dict[int, ConfigRecord],
    threshold: int,
    settings: Settings,
    server_round: int,
    size: int,
) -> np.ndarray:
    """The dequantised sum of the survivors' weighted updates, their masks removed."""
    modulus = settings.modulus
    shares: dict[tuple[str, int], list[bytes]] = {}
    for reply in unmasked.values():
        sent = reply.content.config_records[RECORD]
        for owner, kind, share in zip(
            cast(list[int], sent["owners"]), cast(list[str], sent["kinds"]), cast(list[bytes], sent["shares"])
        ):
            shares.setdefault((str(kind), int(owner)), []).append(share)
    total = np.zeros(size, dtype=np.int64)
    for node, reply in masked.items():
        total = (total + reply.content.array_records[MASKED]["vector"].numpy().astype(np.int64)) % modulus
        seed = _rebuild(shares.get(("seed", node), []), threshold, f"the self mask of node {node}")
        total = (total - _mask(seed, size, modulus)) % modulus
    for node in dropped:
        private = _rebuild(shares.get(("key", node), []), threshold, f"the masks of dropped node {node}")
        for peer in graph[node]:
            if peer in masked:  # the survivor added +pair if peer < node, -pair otherwise: take it back
                pair = _mask(
                    _derive(private, cast(bytes, public[peer]["mask-public"]), b"mask", server_round), size, modulus
                )
                total = (total - pair if peer < node else total + pair) % modulus
    summed: np.ndarray = flower_adapter.dequantize(total, settings.clipping_range, settings.quantization_range)
    return summed - (len(masked) - 1) * settings.clipping_range  # dequantize removed one offset of the k


def _rebuild(shares: list[bytes], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares of {what}, {threshold} needed: too many nodes dropped")
    return flower_adapter.shamir_combine(shares[:threshold])


def _aggregate_reply(
    survivors: list[Message],
    mean: Weights,
    examples: Mapping[int, int],
    masked: Mapping[int, Message],
    weighted: bool = True,
) -> Message:
    """One train reply as the strategy expects it: the model, the summed count, the (weighted) mean metrics.

    ``weighted=False`` (central DP, where every reply weighs 1): the metrics' unweighted means, as
    ``fedplug.dp.FixedDenominator`` gives them for plain replies.
    """
    total = sum(examples[node] for node in masked)
    metrics: dict[str, float] = {}
    counted = 0.0
    for _node, reply in masked.items():
        record = next(iter(reply.content.metric_records.values()))
        count = float(cast(float, record["num-examples"])) if weighted else 1.0
        counted += count
        for key, value in record.items():
            if key != "num-examples" and isinstance(value, int | float):
                metrics[key] = metrics.get(key, 0.0) + float(value) * count
    record = MetricRecord({key: value / counted for key, value in metrics.items()})
    record["num-examples"] = total
    # a reply of the server's own (to the first survivor's reply): the survivors' replies stay as they came
    return Message(RecordDict({"arrays": to_record(mean), "metrics": record}), reply_to=survivors[0])
