"""Training, evaluation and prediction with steps compiled once per process.

The steps are module-level ``nnx.jit`` functions: JAX caches one executable per model
structure and batch shape, so every round and every partition reuses it. Batches
have a fixed size; the last one is padded and its padding masked out, so no example
is dropped and no partition size triggers a compile. Learning rate, momentum and the
FedProx ``proximal-mu`` are arrays (optimizer state or step arguments), never
compile-time constants. Each call moves its data to the device once per epoch and
reads the accumulated metrics back once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedplug.backend import Config
from fedplug_jax.framework import jax, jnp, nnx, optax
from fedplug_jax.nets import Network

EVAL_BATCH = 256
"""Batch size of evaluate and predict: one compiled shape for any data size."""
SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
"""The quickstart's SGD; train sets its hyper-parameters from the config on every call."""


def batch_sums(logits: jax.Array, y: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy (zero on padding) and ``[loss sum, correct count]``."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y) * mask
    correct = ((jnp.argmax(logits, axis=-1) == y) * mask).sum()
    return losses, jnp.stack([losses.sum(), correct])


@nnx.jit
def train_step(
    model: Network,
    optimizer: nnx.Optimizer[Network],
    totals: jax.Array,
    anchor: dict[str, Any],
    mu: jax.Array,
    x: jax.Array,
    y: jax.Array,
    mask: jax.Array,
) -> jax.Array:
    """One SGD step on the real examples of a padded batch; add its sums to ``totals``.

    ``anchor`` holds the parameters at the start of the round, for FedProx's
    ``mu / 2 * ||w - anchor||^2`` (zero when ``mu`` is 0).
    """

    def loss_fn(model: Network) -> tuple[jax.Array, jax.Array]:
        losses, sums = batch_sums(model(x), y, mask)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        drift = sum(jax.tree.leaves(jax.tree.map(lambda p, a: jnp.sum((p - a) ** 2), params, anchor)))
        return losses.sum() / mask.sum() + mu / 2 * drift, sums

    (_, sums), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return totals + sums


@nnx.jit
def eval_step(model: Network, totals: jax.Array, x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Add ``[loss sum, correct count]`` of a padded batch to ``totals``."""
    return totals + batch_sums(model(x), y, mask)[1]


@nnx.jit
def logits_step(model: Network, x: jax.Array) -> jax.Array:
    return model(x)


def batches(order: np.ndarray, size: int, *arrays: np.ndarray) -> list[tuple[jax.Array, ...]]:
    """Batches of exactly ``size`` rows of each array, in ``order``, with a padding mask last.

    The last batch is filled up with repeated rows that the mask (1 real, 0 padding)
    excludes. All batches go to the device in one transfer.
    """
    steps = -(-len(order) // size)
    index = np.resize(order, steps * size)
    mask = (np.arange(steps * size) < len(order)).astype(np.float32)
    host = [array[index] for array in arrays] + [mask]
    split = [list(array.reshape(steps, size, *array.shape[1:])) for array in host]
    return list(zip(*jax.device_put(split)))


def train(model: Network, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    """SGD with momentum for ``local-epochs`` epochs, shuffled by ``seed + server-round``."""
    optimizer = nnx.Optimizer(model, SGD, wrt=nnx.Param)
    hyperparams = optimizer.opt_state.hyperparams
    hyperparams["learning_rate"][...] = jnp.float32(config["lr"])
    hyperparams["momentum"][...] = jnp.float32(config["momentum"])
    mu = jnp.float32(config.get("proximal-mu", 0.0))
    anchor = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(int(config.get("seed", 0)) + int(config.get("server-round", 0)))
    labels, epochs = y.astype(np.int32), int(config["local-epochs"])
    totals = jnp.zeros(2)
    for _ in range(epochs):
        for xb, yb, mb in batches(rng.permutation(len(y)), int(config["batch-size"]), x, labels):
            totals = train_step(model, optimizer, totals, anchor, mu, xb, yb, mb)
    loss, accuracy = jax.device_get(totals) / max(len(y) * epochs, 1)
    return {"loss": float(loss), "accuracy": float(accuracy), "num-examples": len(y)}


def evaluate(model: Network, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    totals = jnp.zeros(2)
    for xb, yb, mb in batches(np.arange(len(y)), EVAL_BATCH, x, y.astype(np.int32)):
        totals = eval_step(model, totals, xb, yb, mb)
    loss, accuracy = jax.device_get(totals) / max(len(y), 1)
    return {"loss": float(loss), "accuracy": float(accuracy), "num-examples": len(y)}


def predict(model: Network, x: np.ndarray) -> np.ndarray:
    """Logits ``(N, classes)``, computed in padded batches and fetched in one transfer."""
    logits = [logits_step(model, xb) for xb, _ in batches(np.arange(len(x)), EVAL_BATCH, x)]
    return np.concatenate(jax.device_get(logits))[: len(x)]
