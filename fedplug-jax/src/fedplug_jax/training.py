"""The JAX implementation: steps compiled once per process, weights and Flax msgpack files.

The steps are module-level ``nnx.jit`` functions: JAX caches one executable per model
structure and batch shape, so every round and every partition reuses it. Batches
have a fixed size; the last one is padded and its padding masked out, so no example
is dropped and no partition size triggers a compile. Learning rate, momentum, weight decay and the
FedProx ``proximal-mu`` are arrays (optimizer state or step arguments), never
compile-time constants. Each call moves its data to the device once per epoch and
reads the accumulated metrics back once.

Flax stores dense kernels ``(in, out)`` and conv kernels ``(kh, kw, in, out)``; weights
are converted to and from the canonical layout with ``fedplug.toolkit``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedplug import Config, DataSpec, Implementation, Weights
from fedplug.toolkit import (
    ADAM_BETAS,
    ADAM_EPS,
    EVAL_BATCH,
    NORM_ARRAYS,
    TrainSettings,
    evaluation,
    from_canonical,
    metrics,
    to_canonical,
)
from fedplug_jax import nets
from fedplug_jax.framework import jax, jnp, nnx, optax, serialization
from fedplug_jax.nets import Network


def sgd(learning_rate: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """``torch.optim.SGD``: coupled L2 decay added to the gradient, then ``optax.sgd``'s momentum trace."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


def adam(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """``torch.optim.Adam``: coupled L2 decay added to the gradient, then ``optax.adam`` (eps outside the sqrt)."""
    b1, b2 = ADAM_BETAS
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=b1, b2=b2, eps=ADAM_EPS))


OPTIMIZERS = {
    "sgd": optax.inject_hyperparams(sgd)(learning_rate=0.1, momentum=0.9, weight_decay=0.0),
    "adam": optax.inject_hyperparams(adam)(learning_rate=0.001, weight_decay=0.0),
}
"""The contract's optimisers; ``train`` sets their hyper-parameters (arrays, not compile-time constants) every call."""


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
    """One optimiser step on the real examples of a padded batch; add its sums to ``totals``.

    ``anchor`` holds the parameters at the start of the round, for FedProx's
    ``mu / 2 * ||w - anchor||^2`` (zero when ``mu`` is 0).
    """

    def loss_fn(model: Network) -> tuple[jax.Array, jax.Array]:
        logits = model(x, mask) if isinstance(model, Network) else model(x)  # lenet-bn: statistics of real rows
        losses, sums = batch_sums(logits, y, mask)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        drift = sum(jax.tree.leaves(jax.tree.map(lambda p, a: jnp.sum((p - a) ** 2), params, anchor)))
        return losses.sum() / mask.sum() + mu / 2 * drift, sums

    (_, sums), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return jnp.add(totals, sums)


@nnx.jit
def logits_step(model: Network, x: jax.Array) -> jax.Array:
    logits: jax.Array = model(x)
    return logits


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


def parameters(model: Network) -> list[tuple[str, nnx.Variable[jax.Array]]]:
    """``(canonical name, Flax variable)`` pairs in canonical order: ``lenet-bn``'s normalisation arrays first,
    then each layer's kernel and bias (``lenet-bn``'s convs have none)."""
    norms = [
        (f"norm.{i}.{part}", variable)
        for i, norm in enumerate(model.norms)
        for part, variable in zip(NORM_ARRAYS, (norm.scale, norm.bias, norm.mean, norm.var), strict=True)
    ]
    return norms + [
        (f"layers.{i}.{part}", variable)
        for i, layer in enumerate(model.layers)
        for part, variable in (("weight", layer.kernel), ("bias", layer.bias))
        if variable is not None
    ]


class JaxImplementation(Implementation):
    """Flax NNX networks trained with Optax SGD or Adam (weight decay, FedProx) in the core's example order."""

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Network:
        return nets.build(model, spec, config)

    def build_custom(self, make: Callable[[], Any], spec: DataSpec, config: Config) -> nnx.Module:
        return nets.build_custom(make, config)

    def get_native_weights(self, model: nnx.Module) -> Weights:
        """Parameters and batch statistics in Flax's layouts, named by their path (``conv1.kernel``)."""
        pure = nnx.to_pure_dict(nnx.state(model, nets.NATIVE))
        values = jax.device_get([_at(pure, path) for _, path in nets.native_paths(model)])
        return {name: np.array(value, np.float32) for (name, _), value in zip(nets.native_paths(model), values)}

    def set_native_weights(self, model: nnx.Module, weights: Weights) -> None:
        state = nnx.state(model, nets.NATIVE)
        pure = nnx.to_pure_dict(state)
        named = nets.native_paths(model)
        arrays = jax.device_put([np.asarray(weights[name], np.float32) for name, _ in named])
        for (_, path), array in zip(named, arrays):
            _at(pure, path[:-1])[path[-1]] = array
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)

    def get_weights(self, model: Network) -> Weights:
        """Canonical weights as fresh numpy arrays, fetched in one device transfer."""
        named = parameters(model)
        arrays = jax.device_get([variable[...] for _, variable in named])
        return {name: to_canonical(np.asarray(array), "hwio") for (name, _), array in zip(named, arrays)}

    def set_weights(self, model: Network, weights: Weights) -> None:
        """Load canonical weights into ``model``, sent to the device in one transfer."""
        named = parameters(model)
        arrays = []
        for name, variable in named:
            array = from_canonical(np.asarray(weights[name], dtype=np.float32), "hwio")
            if array.shape != variable.shape:
                expected = to_canonical(np.zeros(variable.shape), "hwio").shape
                raise ValueError(f"{name} must have shape {expected}, got {np.shape(weights[name])}")
            arrays.append(array)
        for (_, variable), value in zip(named, jax.device_put(arrays)):
            variable[...] = value

    def train(self, model: Network, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """The contract's optimiser, fresh every call, for ``local-epochs`` epochs in the core's example order."""
        settings = TrainSettings.from_config(config)
        optimizer = nnx.Optimizer(model, OPTIMIZERS[settings.optimizer], wrt=nnx.Param)
        hyperparams = optimizer.opt_state.hyperparams
        hyperparams["learning_rate"][...] = jnp.float32(settings.lr)
        hyperparams["weight_decay"][...] = jnp.float32(settings.weight_decay)
        if "momentum" in hyperparams:
            hyperparams["momentum"][...] = jnp.float32(settings.momentum)
        mu = jnp.float32(settings.proximal_mu)
        anchor = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        labels = y.astype(np.int32)
        totals = jnp.zeros(2)
        shared = isinstance(model, Network)  # a custom model's modes are the user's
        if shared:
            model.train()  # type: ignore[no-untyped-call]  # lenet-bn: batch statistics, running ones updated
        try:
            for epoch in range(settings.epochs):
                for xb, yb, mb in batches(settings.order(len(y), epoch), settings.batch_size, x, labels):
                    totals = train_step(model, optimizer, totals, anchor, mu, xb, yb, mb)
        finally:
            if shared:
                model.eval()  # type: ignore[no-untyped-call]  # lenet-bn: running statistics in evaluate and predict
        loss_sum, correct = jax.device_get(totals)
        return metrics(loss_sum, correct, len(y) * settings.epochs, len(y))

    def evaluate(self, model: Network, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        return evaluation(self.predict(model, x), y)

    def predict(self, model: Network, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)``, computed in padded batches and fetched in one transfer."""
        logits = [logits_step(model, xb) for xb, _ in batches(np.arange(len(x)), EVAL_BATCH, x)]
        return np.concatenate(jax.device_get(logits))[: len(x)]

    def save(self, model: Network, path: Path) -> None:
        """Write the model's state, in Flax's own layout, as Flax msgpack."""
        path.write_bytes(serialization.to_bytes(nnx.to_pure_dict(nnx.state(model))))

    def load(self, model: Network, path: Path) -> Network:
        """Read a file written by ``save`` into ``model`` (msgpack, no pickle); return it."""
        target = nnx.to_pure_dict(nnx.state(model))
        restored = serialization.from_bytes(target, path.read_bytes())
        if jax.tree.map(np.shape, restored) != jax.tree.map(np.shape, target):
            raise ValueError(f"{path} holds a model of another architecture or data shape")
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, jax.device_put(restored))
        nnx.update(model, state)
        return model


def _at(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree
