"""Train, evaluate and predict with ``fit``/``evaluate``/``predict`` on a model compiled once.

Keras caches its compiled step functions on the model (``train_function`` and co.),
so reusing one model object across rounds reuses one graph. Nothing here
recompiles, rebuilds or calls ``keras.backend.clear_session``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedplug.backend import Config
from fedplug_keras.framework import import_keras, set_seed

PREDICT_BATCH = 512


def model_inputs(net: Any, x: np.ndarray) -> np.ndarray:
    """NCHW images as the model takes them: NHWC, or flat ``C*H*W`` features for ``mlp``."""
    if len(net.input_shape) == 2:
        return x.reshape(len(x), -1)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def restart_optimizer(net: Any, lr: float) -> None:
    """A fresh Adam at ``lr`` for this round, in place: zero its moments and step count."""
    optimizer = net.optimizer
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate.assign(lr)


def reseed(net: Any, seed: int) -> None:
    """Make this call's randomness (shuffling, dropout) depend on ``seed`` only.

    Dropout layers keep a seed state that advances with every step; restarting it
    keeps a process that trains several nodes in turn from mixing their histories.
    """
    for layer in net.layers:
        generator = getattr(layer, "seed_generator", None)
        if generator is not None:
            generator.state.assign(np.array([seed, 0], dtype=generator.state.dtype))


def train(net: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    """``local-epochs`` epochs of ``fit`` at the config's ``lr``, shuffled by seed and round."""
    seed = int(config.get("seed", 0)) + int(config.get("server-round", 0))
    set_seed(import_keras(config), seed)
    reseed(net, seed)
    restart_optimizer(net, float(config["lr"]))
    history = net.fit(
        model_inputs(net, x),
        y,
        batch_size=int(config["batch-size"]),
        epochs=int(config["local-epochs"]),
        shuffle=True,
        verbose=0,
    ).history
    return {
        "loss": float(np.mean(history["loss"])),
        "accuracy": float(np.mean(history["accuracy"])),
        "num-examples": len(y),
    }


def evaluate(net: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    """Loss and accuracy over ``(x, y)``."""
    metrics = net.evaluate(model_inputs(net, x), y, batch_size=int(config["batch-size"]), verbose=0, return_dict=True)
    return {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]), "num-examples": len(y)}


def predict(net: Any, x: np.ndarray) -> np.ndarray:
    """Class scores: logits for ``mlp`` and ``lenet``, probabilities for the quickstart's ``cnn``."""
    return np.asarray(net.predict(model_inputs(net, x), batch_size=PREDICT_BATCH, verbose=0))


def save(net: Any, path: Path) -> None:
    """The native ``.keras`` archive: architecture, weights and optimizer state, no pickle."""
    net.save(path)


def load(net: Any, path: Path) -> Any:
    """Copy the weights of a ``.keras`` archive into ``net``, built like the saved model.

    The archive is read by Keras's own loader in safe mode; ``net`` keeps its
    compiled functions. The saved optimizer state is not restored: each round
    restarts the optimizer anyway.
    """
    from keras.saving import load_model  # Keras is imported: ``net`` exists

    net.set_weights(load_model(path, compile=False, safe_mode=True).get_weights())
    return net
