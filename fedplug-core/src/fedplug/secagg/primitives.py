"""SecAgg+'s names, settings and primitives: X25519 + HKDF keys, AES-CTR masks, the ring of neighbours."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedplug.backend import Config, Weights

SETUP, SHARE, COLLECT, UNMASK = "secagg_setup", "secagg_share", "secagg_collect", "secagg_unmask"
STAGES = (SETUP, SHARE, COLLECT, UNMASK)
"""The actions of the ``train`` messages of the protocol, in order."""
RECORD = "secagg"
"""Key of the ConfigRecord that carries the protocol's values in each message (and the node's state)."""
MASKED = "masked"
"""Key of the ArrayRecord of a node's masked vector."""


@dataclass(frozen=True)
class Settings:
    """The run config's ``secagg.*`` values."""

    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus: int
    dp: str = ""
    """The run config's differential privacy (``fedplug.dp.mode``): ``client-fixed``, ``local`` or off."""
    dp_clipping_norm: float = 0.0
    dp_local: tuple[float, float, int] = (0.0, 0.0, 0)
    """Local DP's ``dp.noise-multiplier``, ``dp.delta`` and ``dp.noise-seed``."""

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        from fedplug import dp

        return cls(
            int(config["secagg.num-shares"]),
            int(config["secagg.reconstruction-threshold"]),
            float(config["secagg.clipping-range"]),
            int(config["secagg.quantization-range"]),
            int(config["secagg.modulus-range"]),
            dp.mode(config),
            float(config.get("dp.clipping-norm", 0.0)),
            (
                float(config.get("dp.noise-multiplier", 0.0)),
                float(config.get("dp.delta", 0.0)),
                int(config.get("dp.noise-seed", 0)),
            ),
        )

    def threshold_for(self, group: int) -> int:
        """Shares needed to rebuild a secret shared among ``group`` nodes: the configured one, or a majority."""
        return self.threshold or max(2, group // 2 + 1)

    def quantisation_slack(self, size: int) -> float:
        """How much quantising can lengthen an update of ``size`` weights: under one quantum per coordinate.

        Stochastic rounding moves each coordinate by less than ``2 * clipping-range / quantization-range``,
        so the L2 norm grows by less than ``sqrt(size)`` quanta. Under central DP a node clips its update
        to ``dp.clipping-norm`` minus this slack, so that what enters the sum is within ``dp.clipping-norm``:
        the sensitivity the noise is calibrated to.
        """
        return math.sqrt(size) * 2 * self.clipping_range / self.quantization_range


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
