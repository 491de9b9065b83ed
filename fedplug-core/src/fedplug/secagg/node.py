"""SecAgg+ on a node: the four stages as fedplug's ClientApp (``fedplug.apps``) calls them."""

from __future__ import annotations

import os
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedplug import flower_adapter
from fedplug.records import from_record
from fedplug.secagg.primitives import (
    COLLECT,
    MASKED,
    RECORD,
    SETUP,
    SHARE,
    STAGES,
    UNMASK,
    Settings,
    _aad,
    _derive,
    _flatten,
    _key_pair,
    _mask,
)
from fedplug.validation import check_weights, clip_update


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


def client_setup(msg: Message, state: RecordDict, node_id: int, settings: Settings) -> RecordDict:
    """Stage 1: new key pairs for this round; reply with the public keys.

    The quantisation and the threshold come from this node's own run config (``settings``), not from the server.
    """
    sent = msg.content.config_records[RECORD]
    mask_private, mask_public = _key_pair()
    share_private, share_public = _key_pair()
    record = ConfigRecord(
        {
            "round": sent["round"],
            "stage": SETUP,
            "node": node_id,
            "mask-private": mask_private,
            "share-private": share_private,
            "clipping-range": settings.clipping_range,
            "quantization-range": settings.quantization_range,
            "modulus": settings.modulus,
            "configured-threshold": settings.threshold,
            "dp": settings.dp,
            "dp-clipping-norm": settings.dp_clipping_norm,
            "dp-noise-multiplier": settings.dp_local[0],
            "dp-delta": settings.dp_local[1],
            "dp-noise-seed": settings.dp_local[2],
        }
    )
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
    needed = int(cast(int, record["configured-threshold"])) or max(2, len(nodes) // 2 + 1)
    if not needed <= threshold <= len(nodes):  # a server cannot lower the threshold this node's run config sets
        raise ValueError(f"secagg_share: threshold {threshold} for {len(nodes)} neighbours, this node needs {needed}")
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
    if record["dp"] == "local":  # local DP: Flower's LocalDpMod clips and noises the update before it is masked
        trained = _local_dp(msg, trained, record, server_round, me)
    weights = from_record(next(iter(trained.array_records.values())))
    reason = check_weights(weights, reference)
    if reason is not None:
        raise ValueError(f"this node's update cannot be sent: {reason}")
    clip_norm = float(cast(float, sent["clip-norm"]))
    if clip_norm > 0:
        weights = clip_update(weights, reference, clip_norm)
    names = list(reference)
    update = _flatten(weights, names) - _flatten(reference, names)
    # central DP: weight 1, clipped by this node's own run config; otherwise FedAvg's weight n / n_max
    central = record["dp"] == "client-fixed"
    update = _dp_clip(update, record) if central else float(cast(float, sent["weight"])) * update
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


def _dp_clip(update: np.ndarray, record: ConfigRecord) -> np.ndarray:
    """Central DP (``dp=client-fixed``): the update clipped so that, quantised, its norm stays within the clipping norm.

    The weight is 1 whatever the server asks (the noise is calibrated to one clipped update per node), and the
    clipping norm is this node's run config's, less the quantisation's slack (``Settings.quantisation_slack``).
    """
    norm = float(cast(float, record["dp-clipping-norm"]))
    clipping_range, quantization_range = (
        float(cast(float, record["clipping-range"])),
        int(cast(int, record["quantization-range"])),
    )
    settings = Settings(0, 0, clipping_range, quantization_range, 0)
    bound = norm - settings.quantisation_slack(update.size)
    if bound <= 0:
        raise ValueError(
            f"dp.clipping-norm {norm:g} is within the quantisation error of {update.size} weights: "
            "raise secagg.quantization-range or dp.clipping-norm"
        )
    length = float(np.linalg.norm(update))
    return update * (bound / length) if length > bound else update


def _local_dp(msg: Message, trained: RecordDict, record: ConfigRecord, server_round: int, node: int) -> RecordDict:
    """Local DP (``dp=local``): Flower's ``LocalDpMod`` (``fedplug.dp.local_mod``) on this node's train reply.

    The noise key is fresh for every update (``fedplug.dp.noise_key``); with ``dp.noise-seed`` set, it is that
    seed's, with the round and this node's id (the protocol's state does not know the partition).
    """
    from fedplug import dp

    config = {
        "dp.clipping-norm": record["dp-clipping-norm"],
        "dp.noise-multiplier": record["dp-noise-multiplier"],
        "dp.delta": record["dp-delta"],
        "dp.noise-seed": record["dp-noise-seed"],
    }

    def answer(_msg: Message, _context: object) -> Message:
        return Message(content=trained, reply_to=msg)

    with dp.seeded(*dp.noise_key(config), server_round, node % 2**32):
        reply: Message = dp.local_mod(config)(msg, cast(Any, None), answer)
    if reply.has_error():
        raise ValueError(f"local DP: {reply.error.reason}")
    return reply.content


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
