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

Differential privacy (``docs/secagg.md``): with ``dp=client-fixed`` each node clips its update to
``dp.clipping-norm`` less the quantisation's slack and masks it with weight 1, and the one reply carries
``global + the unmasked sum``, which ``fedplug.dp``'s wrapper divides by the expected count and noises,
as for plain client-fixed replies; with ``dp=local`` each node runs Flower's ``LocalDpMod`` before masking.
Server-side and adaptive clipping are refused with secagg.

Primitives: ``cryptography`` (X25519, HKDF-SHA256, AES-GCM, and AES-CTR as the masks' pseudo-random
generator), Flower's Shamir sharing on ``pycryptodome`` and Flower's quantisation, both through
``fedplug.flower_adapter``. Flower's own ``pseudo_rand_gen`` is not used: it seeds NumPy's Mersenne
Twister with 32 bits of the seed, so a self mask could be found by trying 2**32 seeds.
"""

from __future__ import annotations  # noqa: I001  (two lines of re-exports: no copy of node.py's import list)

from fedplug.secagg.node import client_mask, client_setup, client_share, client_unmask
from fedplug.secagg.primitives import COLLECT, MASKED, RECORD, SETUP, SHARE, STAGES, UNMASK
from fedplug.secagg.primitives import Settings, _flatten, neighbours
from fedplug.secagg.server import Outcome, secure_train

__all__ = [
    "COLLECT",
    "MASKED",
    "RECORD",
    "SETUP",
    "SHARE",
    "STAGES",
    "UNMASK",
    "Outcome",
    "Settings",
    "_flatten",
    "client_mask",
    "client_setup",
    "client_share",
    "client_unmask",
    "neighbours",
    "secure_train",
]
