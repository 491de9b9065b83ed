"""What every backend needs and may take from here: settings, example order, metrics, layouts.

Using these keeps a backend on the core's policies, so that backends agree with each
other (and with the reference ``numpy`` backend) wherever the contract fixes a choice:

- ``TrainSettings.from_config``: the training settings of one ``train`` call, read from
  that call's config (the server may change them every round), with the optimiser
  (``OPTIMIZERS``, ``ADAM_BETAS``, ``ADAM_EPS``) whose exact update the numpy reference defines;
- ``example_order``: the core's order of a node's examples, one seeded permutation per
  node, round and epoch, from ``seed``, ``server-round`` and ``partition-id``;
- ``metrics``: the metrics dict ``train`` and ``evaluate`` return, with Python types;
- ``EVAL_BATCH`` and ``eval_chunks``: the batches of ``evaluate`` and ``predict``;
- the layout conversions between the canonical layout (dense ``(out, in)``, conv
  ``(out, in, kh, kw)``, features flattened ``(C, H, W)``) and the usual native ones, and
  ``channels_last`` for the images of a channels-last framework;
- the shared models' architecture (``LENET_CONV``, ``LENET_DENSE``, ``hidden_dims``,
  ``lenet_flat_features``, ``canonical_shapes``; ``lenet-bn``'s ``BN_MOMENTUM``, ``BN_EPS``,
  ``NORM_PREFIX``, ``NORM_ARRAYS``), ``check_custom_model`` for what a custom
  model's factory returned, ``cpu_share`` for thread pools, and ``held_back_stderr`` for
  native start-up chatter.

Together with ``fedplug.__all__`` this module is the whole API a backend may import
(``fedplug-core/tests/test_backend_api.py`` checks every bundled backend). Only numpy is
imported here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fedplug.backend import Config, ModelError
from fedplug.models import (
    BN_EPS,
    BN_MOMENTUM,
    LENET_CONV,
    LENET_DENSE,
    NORM_ARRAYS,
    NORM_PREFIX,
    canonical_shapes,
    hidden_dims,
    lenet_flat_features,
)
from fedplug.runtime import cpu_share

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "BN_EPS",
    "BN_MOMENTUM",
    "EVAL_BATCH",
    "LENET_CONV",
    "LENET_DENSE",
    "NORM_ARRAYS",
    "NORM_PREFIX",
    "OPTIMIZERS",
    "TrainSettings",
    "canonical_shapes",
    "channels_last",
    "check_custom_model",
    "conv_from_canonical",
    "conv_to_canonical",
    "cpu_share",
    "dense_from_canonical",
    "dense_to_canonical",
    "eval_chunks",
    "evaluation",
    "example_order",
    "flat_dense_from_canonical",
    "flat_dense_to_canonical",
    "from_canonical",
    "held_back_stderr",
    "hidden_dims",
    "lenet_flat_features",
    "metrics",
    "to_canonical",
]

T = TypeVar("T")


EVAL_BATCH = 1024
"""Examples per forward pass in ``evaluate`` and ``predict`` (no gradients, so larger than training's)."""
OPTIMIZERS = ("sgd", "adam")
"""Values of the run-config key ``optimizer``; ``fedplug.numpy_backend`` defines each update exactly."""
ADAM_BETAS = (0.9, 0.999)
"""Adam's decay rates of the first and second moment estimates (PyTorch's and Optax's defaults)."""
ADAM_EPS = 1e-8
"""Adam's epsilon, added to the bias-corrected ``sqrt(v_hat)`` (PyTorch's form; Keras's differs)."""


def example_order(n: int, seed: int, server_round: int, partition_id: int, epoch: int) -> np.ndarray:
    """The core's order of ``n`` examples: a permutation seeded by node, round and epoch.

    Every backend visiting examples in this order makes a federation of SGD backends
    follow the same trajectory, and keeps ``train`` free of random state across calls.
    """
    if min(seed, server_round, partition_id, epoch) < 0:
        raise ValueError("seed, server-round, partition-id and epoch must be non-negative")
    return np.random.default_rng([seed, server_round, partition_id, epoch]).permutation(n)


@dataclass(frozen=True)
class TrainSettings:
    """The settings of one ``train`` call, read once from its config.

    The optimiser (the same in every backend; ``fedplug.numpy_backend.reference_step`` is its
    definition), for each parameter ``w`` with mini-batch mean gradient ``g``:

    - ``g += weight_decay * w + proximal_mu * (w - w_start)`` (coupled L2 decay, as
      ``torch.optim``'s ``weight_decay``; FedProx's term, ``w_start`` the weights the call began with);
    - ``sgd``: ``v = momentum * v + g``; ``w -= lr * v`` (``torch.optim.SGD``, no dampening, no Nesterov);
    - ``adam``: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, step ``t`` from 1,
      ``w -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` with ``ADAM_BETAS`` and
      ``ADAM_EPS`` (``torch.optim.Adam``); ``momentum`` does not apply.

    Optimiser state (``v``, ``m``, ``t``) starts from zero in every ``train`` call.
    """

    lr: float
    momentum: float
    batch_size: int
    epochs: int
    proximal_mu: float
    seed: int
    server_round: int
    partition_id: int
    optimizer: str = "sgd"
    weight_decay: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> TrainSettings:
        """Read ``optimizer``, ``lr``, ``momentum``, ``weight-decay``, ``batch-size``, ``local-epochs``,
        ``proximal-mu``, ``seed``, ``server-round`` and ``partition-id`` (absent optional keys: ``sgd``, 0).

        Raises ``ValueError`` for an ``optimizer`` not in ``OPTIMIZERS`` (the run-config checks
        refuse it earlier, with a one-line message)."""
        optimizer = str(config.get("optimizer", "sgd"))
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        return cls(
            optimizer=optimizer,
            weight_decay=float(config.get("weight-decay", 0.0)),
            lr=float(config["lr"]),
            momentum=float(config.get("momentum", 0.0)),
            batch_size=int(config["batch-size"]),
            epochs=int(config["local-epochs"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            seed=int(config.get("seed", 0)),
            server_round=int(config.get("server-round", 0)),
            partition_id=int(config.get("partition-id", 0)),
        )

    @property
    def round_seed(self) -> int:
        """A seed in ``[0, 2**31)`` for this call's other randomness (dropout, framework RNGs).

        It depends on ``seed``, ``server-round`` and ``partition-id``, like the example order."""
        state = np.random.SeedSequence([self.seed, self.server_round, self.partition_id]).generate_state(1)
        return int(state[0]) % 2**31

    def order(self, n: int, epoch: int) -> np.ndarray:
        """``example_order`` of this call's node and round, for ``epoch``."""
        return example_order(n, self.seed, self.server_round, self.partition_id, epoch)

    def batches(self, n: int) -> Iterator[np.ndarray]:
        """Index arrays of every mini-batch of every epoch, in the core's order (the last may be short)."""
        for epoch in range(self.epochs):
            order = self.order(n, epoch)
            for start in range(0, n, self.batch_size):
                yield order[start : start + self.batch_size]


def metrics(loss_sum: float, correct: float, seen: int, num_examples: int | None = None) -> dict[str, float]:
    """``loss`` and ``accuracy`` as means over ``seen`` examples, and ``num-examples`` (default ``seen``).

    ``train`` passes the sums over all its epochs, ``seen = epochs * len(y)`` and ``num_examples = len(y)``.
    """
    count = max(seen, 1)
    return {
        "loss": float(loss_sum) / count,
        "accuracy": float(correct) / count,
        "num-examples": int(seen if num_examples is None else num_examples),
    }


def evaluation(logits: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """``evaluate``'s metrics from the logits ``(N, classes)`` of every example (``predict``'s): the mean softmax
    cross-entropy, the accuracy and ``num-examples``, computed on the host as the numpy reference does."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss_sum = -float(log_probs[np.arange(len(y)), y].sum(dtype=np.float64))
    return metrics(loss_sum, int((logits.argmax(axis=1) == y).sum()), len(y))


def eval_chunks(n: int) -> list[slice]:
    """Slices of ``n`` examples for ``evaluate`` and ``predict``: ``EVAL_BATCH`` each, the last shorter."""
    return [slice(start, start + EVAL_BATCH) for start in range(0, n, EVAL_BATCH)]


def check_custom_model(net: object, kind: type[T] | tuple[type, ...], what: str, config: Config) -> T:
    """Return ``net`` if it is a ``kind``; else raise ``ModelError`` naming what the factory returned instead.

    ``what`` names ``kind`` for users, e.g. ``"a torch.nn.Module"``; ``config['model']`` is the factory."""
    if not isinstance(net, kind):
        returned = f"{type(net).__module__}.{type(net).__qualname__}"
        raise ModelError(f"custom model {config.get('model', '')} returned a {returned}, not {what}")
    return net  # type: ignore[return-value]


@contextlib.contextmanager
def held_back_stderr(unless_imported: str = "") -> Iterator[None]:
    """Hold back what native code writes to stderr (file descriptor 2) in the block; show it if the block fails.

    For a framework that logs at start-up before its log level is read (TensorFlow's oneDNN
    notice): import it inside the block. Nothing is held back if module ``unless_imported``
    is imported already.
    """
    if unless_imported in sys.modules:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))


# -- layout conversions: canonical <-> native -----------------------------------------------


def channels_last(x: np.ndarray) -> np.ndarray:
    """Images ``(N, C, H, W)`` as a channels-last framework takes them: contiguous ``(N, H, W, C)``."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


CONV_AXES = {"hwio": (2, 3, 1, 0), "ohwi": (0, 2, 3, 1), "oihw": (0, 1, 2, 3)}
"""Axis order taking a canonical conv weight ``(out, in, kh, kw)`` to each native layout:
``hwio`` is Keras's and Flax's ``(kh, kw, in, out)``, ``ohwi`` MLX's ``(out, kh, kw, in)``."""


def dense_from_canonical(weight: np.ndarray) -> np.ndarray:
    """Canonical dense ``(out, in)`` -> an ``(in, out)`` kernel (Keras, Flax)."""
    return np.ascontiguousarray(weight.T)


def dense_to_canonical(kernel: np.ndarray) -> np.ndarray:
    """An ``(in, out)`` kernel -> canonical ``(out, in)``."""
    return np.ascontiguousarray(kernel.T)


def conv_from_canonical(weight: np.ndarray, layout: str) -> np.ndarray:
    """Canonical conv ``(out, in, kh, kw)`` -> the native ``layout`` (a key of ``CONV_AXES``)."""
    return np.ascontiguousarray(weight.transpose(CONV_AXES[layout]))


def conv_to_canonical(kernel: np.ndarray, layout: str) -> np.ndarray:
    """A native ``layout`` conv kernel -> canonical ``(out, in, kh, kw)``."""
    return np.ascontiguousarray(kernel.transpose(np.argsort(CONV_AXES[layout])))


def flat_dense_from_canonical(weight: np.ndarray, feature_map: tuple[int, int, int]) -> np.ndarray:
    """The canonical ``(out, C*H*W)`` weight of a dense layer after a flatten, as an ``(H*W*C, out)`` kernel.

    For a framework that flattens channels-last ``(H, W, C)`` feature maps (``feature_map``
    is that map's ``(H, W, C)``) and keeps dense kernels ``(in, out)``, as Keras does.
    """
    height, width, channels = feature_map
    out = weight.shape[0]
    native = weight.reshape(out, channels, height, width).transpose(2, 3, 1, 0)
    return np.ascontiguousarray(native.reshape(height * width * channels, out))


def flat_dense_to_canonical(kernel: np.ndarray, feature_map: tuple[int, int, int]) -> np.ndarray:
    """The inverse of ``flat_dense_from_canonical``."""
    height, width, channels = feature_map
    out = kernel.shape[1]
    canonical = kernel.reshape(height, width, channels, out).transpose(3, 2, 0, 1)
    return np.ascontiguousarray(canonical.reshape(out, channels * height * width))


def from_canonical(weight: np.ndarray, layout: str, feature_map: tuple[int, int, int] | None = None) -> np.ndarray:
    """Any canonical weight in a framework's ``layout`` (a key of ``CONV_AXES``): conv weights in that layout,
    dense weights as ``(in, out)`` kernels where conv kernels put ``in`` before ``out`` (``"hwio"``), else
    unchanged; a dense layer after a flatten of ``feature_map`` ``(H, W, C)``, as ``flat_dense_from_canonical``."""
    if weight.ndim == 4:
        return conv_from_canonical(weight, layout)
    if weight.ndim == 2 and feature_map is not None:
        return flat_dense_from_canonical(weight, feature_map)
    if weight.ndim == 2 and layout == "hwio":
        return dense_from_canonical(weight)
    return np.array(weight)


def to_canonical(native: np.ndarray, layout: str, feature_map: tuple[int, int, int] | None = None) -> np.ndarray:
    """The inverse of ``from_canonical``."""
    if native.ndim == 4:
        return conv_to_canonical(native, layout)
    if native.ndim == 2 and feature_map is not None:
        return flat_dense_to_canonical(native, feature_map)
    if native.ndim == 2 and layout == "hwio":
        return dense_to_canonical(native)
    return np.array(native)
