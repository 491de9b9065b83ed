"""Local training and evaluation of a Gluon model, as in Flower's quickstart-mxnet.

Each call copies its numpy partition to the device once; batches are slices of a
per-epoch shuffled copy on the device, and loss and accuracy are summed on the
device and read once at the end, so MXNet's asynchronous engine is never stalled.
"""

from __future__ import annotations

import numpy as np

from fedplug.backend import Config
from fedplug_mxnet.nets import GluonModel, mx

PREDICT_CHUNK = 1024
"""Examples per forward pass in ``predict`` and ``evaluate``, to bound device memory."""

softmax_cross_entropy = mx.gluon.loss.SoftmaxCrossEntropyLoss()


def train(model: GluonModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    """SGD on softmax cross-entropy for ``local-epochs``, with FedProx's term if ``proximal-mu`` > 0."""
    lr, batch_size = float(config["lr"]), int(config["batch-size"])
    epochs, mu = int(config["local-epochs"]), float(config.get("proximal-mu", 0.0))
    rng = np.random.default_rng(int(config.get("seed", 0)) + int(config.get("server-round", 0)))
    model.trainer.set_learning_rate(lr)
    params = list(model.params.values())
    anchor = [param.data().copy() for param in params] if mu > 0 else []
    data = mx.nd.array(x, ctx=model.ctx, dtype="float32")
    labels = mx.nd.array(y, ctx=model.ctx, dtype="float32")
    total_loss = mx.nd.zeros((1,), ctx=model.ctx)
    correct = mx.nd.zeros((1,), ctx=model.ctx)
    for _ in range(epochs):
        order = mx.nd.array(rng.permutation(len(y)), ctx=model.ctx, dtype="int64")
        shuffled_x, shuffled_y = mx.nd.take(data, order), mx.nd.take(labels, order)
        for start in range(0, len(y), batch_size):
            xb, yb = shuffled_x[start : start + batch_size], shuffled_y[start : start + batch_size]
            with mx.autograd.record():
                logits = model.net(xb)
                loss = softmax_cross_entropy(logits, yb)
            loss.backward()
            for param, start_value in zip(params, anchor, strict=False):  # no anchor: mu == 0
                # gradient of n * mu / 2 * ||w - w_start||^2 for a batch of n; step(n) divides by n
                grad = param.grad()
                grad += xb.shape[0] * mu * (param.data() - start_value)
            model.trainer.step(xb.shape[0])
            total_loss += loss.sum()
            correct += (logits.argmax(axis=1) == yb).sum()
    seen = len(y) * epochs
    return {
        "loss": float(total_loss.asscalar()) / seen,
        "accuracy": float(correct.asscalar()) / seen,
        "num-examples": len(y),
    }


def logits_on_device(model: GluonModel, x: np.ndarray) -> mx.nd.NDArray:
    """The model's logits for ``x``, left on the device."""
    data = mx.nd.array(x, ctx=model.ctx, dtype="float32")
    chunks = [model.net(data[i : i + PREDICT_CHUNK]) for i in range(0, len(x), PREDICT_CHUNK)]
    return mx.nd.concat(*chunks, dim=0)


def predict(model: GluonModel, x: np.ndarray) -> np.ndarray:
    return logits_on_device(model, x).asnumpy()


def evaluate(model: GluonModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    logits = logits_on_device(model, x)
    labels = mx.nd.array(y, ctx=model.ctx, dtype="float32")
    loss = softmax_cross_entropy(logits, labels).mean().asscalar()
    accuracy = (logits.argmax(axis=1) == labels).mean().asscalar()
    return {"loss": float(loss), "accuracy": float(accuracy), "num-examples": len(y)}
