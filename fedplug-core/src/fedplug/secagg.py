"""SecAgg+ for the Message-API round loop (``secagg=true``): the server learns only the weighted sum.

The train step of a round becomes four exchanges of Flower messages between the round loop
(``fedplug.rounds``) and fedplug's ClientApp (``fedplug.apps``), each a ``train.<action>``:

1. ``secagg_setup``: each drawn node makes two X25519 key pairs, one for pairwise masks and one
   for encrypting shares, and returns the public keys.
2. ``secagg_share``: the server sends each node its neighbours' public keys (SecAgg+: a ring of
   ``secagg.num-shares`` nodes, itself included; 0 = every node). The node draws a self-mask seed
   ``b`` and Shamir-shares ``b`` and its mask private key among its neighbours
   (``secagg.reconstruction-threshold`` shares rebuild each); every share travels encrypted
   (AES-GCM, key from X25519 + HKDF) through the server, which cannot read it.
3. ``secagg_collect``: with the global model and the strategy's config, the node trains as usual;
   then it takes its update ``u = w - global`` (clipped to ``clip-norm`` here, on the node, if set),
   weights it by ``n / weight-scale`` (``n`` its examples, the scale the round's largest ``n``),
   quantises it (``secagg.clipping-range``, ``secagg.quantization-range``) and adds, modulo
   ``secagg.modulus-range``, its self mask and one pairwise mask per neighbour (``+`` towards a
   larger node id, ``-`` towards a smaller one). Nodes that do not reply now have *dropped*.
4. ``secagg_unmask``: each surviving node returns its shares of the survivors' ``b`` and of the
   dropped nodes' mask keys, never both for one node. The server rebuilds them, removes the self
   masks and the dropped nodes' pairwise masks from the sum, and dequantises it.

The strategy then aggregates ONE reply: the weighted mean of the survivors' models with their summed
example count, so FedAvg's arithmetic (and FedProx's, FedAdam's, ...) gives that mean. Strategies that
need each update (median, Krum, trimmed mean, Bulyan, q-FedAvg) are refused by ``fedplug.config``.

Primitives: ``cryptography`` (X25519, HKDF-SHA256, AES-GCM, and AES-CTR as the masks' pseudo-random
generator), Flower's Shamir sharing on ``pycryptodome`` and Flower's quantisation, both through
``fedplug.flower_adapter``. Flower's own ``pseudo_rand_gen`` is not used: it seeds NumPy's Mersenne
Twister with 32 bits of the seed, so a self mask could be found by trying 2**32 seeds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedplug import flower_adapter
from fedplug.backend import Config, Weights
from fedplug.records import from_record, to_record
from fedplug.validation import check_metrics, check_weights, clip_update

__all__ = [
    "COLLECT",
    "RECORD",
    "SETUP",
    "SHARE",
    "STAGES",
    "UNMASK",
    "Outcome",
    "Settings",
    "client_mask",
    "client_setup",
    "client_share",
    "client_unmask",
    "neighbours",
    "secure_train",
]

SETUP, SHARE, COLLECT, UNMASK = "secagg_setup", "secagg_share", "secagg_collect", "secagg_unmask"
STAGES = (SETUP, SHARE, COLLECT, UNMASK)
"""The actions of the ``train`` messages of the protocol, in order."""
RECORD = "secagg"
"""Key of the ConfigRecord that carries the protocol's values in each message (and the node's state)."""
MASKED = "masked"
"""Key of the ArrayRecord of a node's masked vector."""


# -- settings and primitives ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The run config's ``secagg.*`` values."""

    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus: int

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        return cls(
            int(config["secagg.num-shares"]),
            int(config["secagg.reconstruction-threshold"]),
            float(config["secagg.clipping-range"]),
            int(config["secagg.quantization-range"]),
            int(config["secagg.modulus-range"]),
        )

    def threshold_for(self, group: int) -> int:
        """Shares needed to rebuild a secret shared among ``group`` nodes: the configured one, or a majority."""
        return self.threshold or max(2, group // 2 + 1)


def neighbours(nodes: list[int], num_shares: int) -> dict[int, list[int]]:
    """SecAgg+'s graph: each node and the ``num_shares - 1`` nodes around it on the ring of ``nodes`` (0: all)."""
    count = len(nodes)
    if num_shares == 0 or num_shares >= count:
        return {node: sorted(nodes) for node in nodes}
    half = (num_shares - 1) // 2
    return {node: sorted({nodes[(at + d) % count] for d in range(-half, half + 1)}) for at, node in enumerate(nodes)}


def _derive(private: bytes, public: bytes, purpose: bytes, server_round: int) -> bytes:
    """A 32-byte key from X25519 key agreement, through HKDF-SHA256 bound to its purpose and the round."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    info = b"fedplug secagg " + purpose + b" round " + str(server_round).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private, public) raw bytes."""
    private = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return (
        private.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        private.public_key().public_bytes(raw, serialization.PublicFormat.Raw),
    )


def _mask(seed: bytes, length: int, modulus: int) -> np.ndarray:
    """``length`` integers uniform in ``[0, modulus)`` (a power of two up to 2**32): AES-256-CTR's keystream."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.int64) & (modulus - 1)


def _aad(server_round: int, src: int, dst: int) -> bytes:
    return f"fedplug secagg share round {server_round} from {src} to {dst}".encode()


def _flatten(weights: Weights, names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[name], dtype=np.float64).ravel() for name in names])


def _unflatten(vector: np.ndarray, reference: Weights) -> Weights:
    out, at = {}, 0
    for name, array in reference.items():
        out[name] = vector[at : at + array.size].reshape(array.shape)
        at += array.size
    return out


# -- the node's side (called by fedplug.apps' ClientApp) ------------------------------------


def _state(state: RecordDict, server_round: int, stage: str) -> ConfigRecord:
    """This node's protocol state for ``server_round``; refuses a stage out of order."""
    if RECORD not in state.config_records:
        raise ValueError(f"secagg {stage} before secagg_setup")
    record = state.config_records[RECORD]
    if int(cast(int, record["round"])) != server_round:
        raise ValueError(f"secagg {stage} for round {server_round}, but this node set up round {record['round']!r}")
    expected = STAGES[STAGES.index(stage) - 1]
    if record["stage"] != expected:
        raise ValueError(f"secagg {stage} after {record['stage']!r}, expected after {expected}")
    return record


def client_setup(msg: Message, state: RecordDict, node_id: int) -> RecordDict:
    """Stage 1: new key pairs for this round; reply with the public keys."""
    sent = msg.content.config_records[RECORD]
    mask_private, mask_public = _key_pair()
    share_private, share_public = _key_pair()
    record = ConfigRecord(dict(sent))
    record.update({"stage": SETUP, "node": node_id, "mask-private": mask_private, "share-private": share_private})
    state[RECORD] = record
    return RecordDict({RECORD: ConfigRecord({"mask-public": mask_public, "share-public": share_public})})


def client_share(msg: Message, state: RecordDict) -> RecordDict:
    """Stage 2: share the self-mask seed and the mask key among the neighbours, each share encrypted for its holder."""
    sent = msg.content.config_records[RECORD]
    record = _state(state, int(cast(int, sent["round"])), SHARE)
    server_round, me = int(cast(int, record["round"])), int(cast(int, record["node"]))
    nodes = [int(node) for node in cast(list[int], sent["nodes"])]
    if me not in nodes:
        raise ValueError("secagg_share: this node is not among its own neighbours")
    threshold = int(cast(int, sent["threshold"]))
    if not 2 <= threshold <= len(nodes):
        raise ValueError(f"secagg_share: threshold {threshold} for {len(nodes)} neighbours")
    seed = os.urandom(32)
    seed_shares = flower_adapter.shamir_split(seed, threshold, len(nodes))
    key_shares = flower_adapter.shamir_split(cast(bytes, record["mask-private"]), threshold, len(nodes))
    share_publics = cast(list[bytes], sent["share-publics"])
    destinations, ciphertexts = [], []
    for node, public, seed_share, key_share in zip(nodes, share_publics, seed_shares, key_shares):
        plaintext = len(seed_share).to_bytes(2, "big") + seed_share + key_share
        if node == me:
            record.update({"holders": [me], "seed-shares": [seed_share], "key-shares": [key_share]})
            continue
        key = _derive(cast(bytes, record["share-private"]), public, b"share encryption", server_round)
        nonce = os.urandom(12)
        ciphertexts.append(nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(server_round, me, node)))
        destinations.append(node)
    record.update(
        {
            "stage": SHARE,
            "seed": seed,
            "threshold": threshold,
            "nodes": nodes,
            "mask-publics": list(cast(list[bytes], sent["mask-publics"])),
            "share-publics": list(share_publics),
        }
    )
    return RecordDict({RECORD: ConfigRecord({"destinations": destinations, "ciphertexts": ciphertexts})})


def client_mask(msg: Message, state: RecordDict, trained: RecordDict) -> RecordDict:
    """Stage 3, after this node trained: take the shares sent to it, reply with its masked weighted update.

    ``trained`` is the ordinary train reply (weights and metrics); the weights leave this node only masked.
    """
    sent = msg.content.config_records[RECORD]
    record = _state(state, int(cast(int, sent["round"])), COLLECT)
    server_round, me = int(cast(int, record["round"])), int(cast(int, record["node"]))
    nodes = [int(node) for node in cast(list[int], record["nodes"])]
    holders = [int(node) for node in cast(list[int], record["holders"])]
    seed_shares = list(cast(list[bytes], record["seed-shares"]))
    key_shares = list(cast(list[bytes], record["key-shares"]))
    for src, ciphertext in zip(cast(list[int], sent["senders"]), cast(list[bytes], sent["ciphertexts"])):
        src = int(src)
        if src not in nodes or src == me:
            raise ValueError(f"secagg_collect: a share from node {src}, not a neighbour")
        public = cast(list[bytes], record["share-publics"])[nodes.index(src)]
        key = _derive(cast(bytes, record["share-private"]), public, b"share encryption", server_round)
        plaintext = AESGCM(key).decrypt(ciphertext[:12], ciphertext[12:], _aad(server_round, src, me))
        size = int.from_bytes(plaintext[:2], "big")
        holders.append(src)
        seed_shares.append(plaintext[2 : 2 + size])
        key_shares.append(plaintext[2 + size :])
    peers = sorted(set(holders) - {me})  # the neighbours that shared with this node: the pairwise masks
    reference = from_record(cast(ArrayRecord, msg.content["arrays"]))
    weights = from_record(next(iter(trained.array_records.values())))
    reason = check_weights(weights, reference)
    if reason is not None:
        raise ValueError(f"this node's update cannot be sent: {reason}")
    clip_norm = float(cast(float, sent["clip-norm"]))
    if clip_norm > 0:
        weights = clip_update(weights, reference, clip_norm)
    names = list(reference)
    ratio = float(cast(float, sent["weight"]))
    update = ratio * (_flatten(weights, names) - _flatten(reference, names))
    modulus = int(cast(int, record["modulus"]))
    quantized = flower_adapter.quantize(
        update,
        float(cast(float, record["clipping-range"])),
        int(cast(int, record["quantization-range"])),
        seed=int(cast(int, sent["rounding-seed"])),
    )
    masked = (quantized + _mask(cast(bytes, record["seed"]), update.size, modulus)) % modulus
    for peer in peers:
        public = cast(list[bytes], record["mask-publics"])[nodes.index(peer)]
        pair = _mask(_derive(cast(bytes, record["mask-private"]), public, b"mask", server_round), update.size, modulus)
        masked = (masked + pair if me < peer else masked - pair) % modulus
    record.update(
        {"stage": COLLECT, "holders": holders, "seed-shares": seed_shares, "key-shares": key_shares, "peers": peers}
    )
    del record["seed"]  # the node keeps only shares from now on
    reply = RecordDict({MASKED: ArrayRecord({"vector": Array(masked.astype(np.int64))})})
    for name, metrics in trained.metric_records.items():
        reply[name] = metrics
    for name, config in trained.config_records.items():
        reply[name] = config
    return reply


def client_unmask(msg: Message, state: RecordDict) -> RecordDict:
    """Stage 4: the shares of the surviving neighbours' seeds and of the dropped ones' mask keys, never both for one."""
    sent = msg.content.config_records[RECORD]
    record = _state(state, int(cast(int, sent["round"])), UNMASK)
    me = int(cast(int, record["node"]))
    active = {int(node) for node in cast(list[int], sent["active"])}
    dropped = {int(node) for node in cast(list[int], sent["dropped"])}
    peers = set(cast(list[int], record["peers"]))
    if active & dropped or me not in active:
        raise ValueError("secagg_unmask: a node is both active and dropped, or this node is not active")
    if not (active | dropped) - {me} <= peers:
        raise ValueError("secagg_unmask: asked for shares of nodes that are not this node's neighbours")
    if len(active) < int(cast(int, record["threshold"])):
        raise ValueError(f"secagg_unmask: {len(active)} active nodes, fewer than the threshold")
    holders = [int(node) for node in cast(list[int], record["holders"])]
    owners, kinds, shares = [], [], []
    for owner, seed_share, key_share in zip(
        holders, cast(list[bytes], record["seed-shares"]), cast(list[bytes], record["key-shares"])
    ):
        if owner in active or owner in dropped:
            owners.append(owner)
            kinds.append("seed" if owner in active else "key")
            shares.append(seed_share if owner in active else key_share)
    del state[RECORD]  # one answer per round: the server cannot ask again with other lists
    return RecordDict({RECORD: ConfigRecord({"owners": owners, "kinds": kinds, "shares": shares})})


# -- the server's side (called by fedplug.rounds' RoundLoop) --------------------------------


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
    keys = protocol.exchange(
        SETUP,
        {
            node: protocol.record(
                **{
                    "clipping-range": settings.clipping_range,
                    "quantization-range": settings.quantization_range,
                    "modulus": settings.modulus,
                }
            )
            for node in drawn
        },
    )
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
    inbox: dict[int, list[tuple[int, bytes]]] = {node: [] for node in shared}
    for node, reply in shared.items():
        sent = reply.content.config_records[RECORD]
        for dst, ciphertext in zip(cast(list[int], sent["destinations"]), cast(list[bytes], sent["ciphertexts"])):
            if int(dst) in inbox:
                inbox[int(dst)].append((node, ciphertext))
    scale = max(examples[node] for node in shared) if shared else 1
    collect = {}
    for node in shared:
        content = RecordDict(dict(train[node].content.items()))
        content[RECORD] = ConfigRecord(
            {
                "round": server_round,
                "senders": [src for src, _ in inbox[node]],
                "ciphertexts": [ciphertext for _, ciphertext in inbox[node]],
                "weight": examples[node] / scale,
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
    weight_sum = sum(examples[node] / scale for node in masked)
    names = list(reference)
    mean = _flatten(reference, names) + total / weight_sum
    outcome.survivors = [masked[node] for node in sorted(masked)]
    outcome.aggregate = _aggregate_reply(outcome.survivors, _unflatten(mean, reference), examples, masked)
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
    survivors: list[Message], mean: Weights, examples: Mapping[int, int], masked: Mapping[int, Message]
) -> Message:
    """One train reply as the strategy expects it: the mean model, the summed count, the weighted mean metrics."""
    total = sum(examples[node] for node in masked)
    metrics: dict[str, float] = {}
    for _node, reply in masked.items():
        record = next(iter(reply.content.metric_records.values()))
        count = float(cast(float, record["num-examples"]))
        for key, value in record.items():
            if key != "num-examples" and isinstance(value, int | float):
                metrics[key] = metrics.get(key, 0.0) + float(value) * count
    counted = sum(
        float(cast(float, next(iter(r.content.metric_records.values()))["num-examples"])) for r in masked.values()
    )
    record = MetricRecord({key: value / counted for key, value in metrics.items()})
    record["num-examples"] = total
    # a reply of the server's own (to the first survivor's reply): the survivors' replies stay as they came
    return Message(RecordDict({"arrays": to_record(mean), "metrics": record}), reply_to=survivors[0])
