"""The MXNet implementation: local training and evaluation of a Gluon model, as in Flower's quickstart-mxnet.

Each call copies its numpy partition to the device once; batches are slices of a
copy on the device in the core's example order for each epoch, and loss and accuracy are summed on the
device and read once at the end, so MXNet's asynchronous engine is never stalled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedplug import Config, DataSpec, Implementation, Weights
from fedplug.toolkit import ADAM_BETAS, ADAM_EPS, TrainSettings, eval_chunks, evaluation, metrics
from fedplug_mxnet import nets
from fedplug_mxnet.nets import GluonModel, mx

softmax_cross_entropy = mx.gluon.loss.SoftmaxCrossEntropyLoss()


class ContractAdam(mx.optimizer.Adam):  # type: ignore[misc, name-defined]
    """MXNet's Adam with the contract's epsilon: added to the bias-corrected ``sqrt(v_hat)``, as ``torch.optim.Adam``.

    MXNet folds both bias corrections into the learning rate, ``lr * sqrt(1 - b2^t) / (1 - b1^t)``,
    and adds its epsilon to the uncorrected ``sqrt(v)``; an epsilon of ``eps * sqrt(1 - b2^t)``
    makes that the contract's update exactly.
    """

    def update(self, index: Any, weight: Any, grad: Any, state: Any) -> None:
        step = self._index_update_count.get(index, self.begin_num_update) + 1  # the step super() is about to count
        self.epsilon = ADAM_EPS * math.sqrt(1.0 - self.beta2**step)
        super().update(index, weight, grad, state)


def make_trainer(model: GluonModel, settings: TrainSettings) -> Any:
    """A Gluon trainer with zero state for one ``train`` call: the contract's SGD (``mx.optimizer.SGD``,
    momentum, coupled ``wd``) or Adam (``ContractAdam``)."""
    if settings.optimizer == "adam":
        beta1, beta2 = ADAM_BETAS
        optimizer = ContractAdam(
            learning_rate=settings.lr, beta1=beta1, beta2=beta2, epsilon=ADAM_EPS, wd=settings.weight_decay
        )
    else:
        optimizer = mx.optimizer.SGD(learning_rate=settings.lr, momentum=settings.momentum, wd=settings.weight_decay)
    return mx.gluon.Trainer(model.net.collect_params(), optimizer)


class MXNetImplementation(Implementation):
    """Hybridized Gluon networks in the canonical layout (Gluon's own), the contract's SGD or Adam, FedProx's term."""

    def build_model(self, model: str, spec: DataSpec, config: Config) -> GluonModel:
        return nets.build_model(model, spec, config)

    def get_weights(self, model: GluonModel) -> Weights:
        """Gluon's layouts are the canonical ones: only copied out."""
        return {key: param.data().asnumpy() for key, param in model.params.items()}

    def set_weights(self, model: GluonModel, weights: Weights) -> None:
        """Copy canonical weights in, through device arrays.

        After a forward pass oneDNN may hold conv weights in its own memory layout, which
        MXNet can overwrite from another NDArray but not from a numpy array.
        """
        for key, param in model.params.items():
            param.set_data(mx.nd.array(weights[key], ctx=model.ctx, dtype="float32"))

    def train(self, model: GluonModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """The contract's optimiser (a fresh trainer every call) on softmax cross-entropy for ``local-epochs``,
        with FedProx's term if ``proximal-mu`` > 0."""
        settings = TrainSettings.from_config(config)
        mu, batch_size = settings.proximal_mu, settings.batch_size
        trainer = make_trainer(model, settings)
        params = list(model.params.values())
        anchor = [param.data().copy() for param in params] if mu > 0 else []
        data = mx.nd.array(x, ctx=model.ctx, dtype="float32")
        labels = mx.nd.array(y, ctx=model.ctx, dtype="float32")
        total_loss = mx.nd.zeros((1,), ctx=model.ctx)
        correct = mx.nd.zeros((1,), ctx=model.ctx)
        for epoch in range(settings.epochs):
            order = mx.nd.array(settings.order(len(y), epoch), ctx=model.ctx, dtype="int64")
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
                trainer.step(xb.shape[0])
                total_loss += loss.sum()
                correct += (logits.argmax(axis=1) == yb).sum()
        return metrics(total_loss.asscalar(), correct.asscalar(), len(y) * settings.epochs, len(y))

    def evaluate(self, model: GluonModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        return evaluation(self.predict(model, x), y)

    def predict(self, model: GluonModel, x: np.ndarray) -> np.ndarray:
        data = mx.nd.array(x, ctx=model.ctx, dtype="float32")
        logits: np.ndarray = mx.nd.concat(*[model.net(data[chunk]) for chunk in eval_chunks(len(x))], dim=0).asnumpy()
        return logits

    def save(self, model: GluonModel, path: Path) -> None:
        """Gluon's native ``.params`` file (MXNet's NDArray list format)."""
        model.net.save_parameters(str(path))

    def load(self, model: GluonModel, path: Path) -> GluonModel:
        """Read a ``.params`` file with MXNet's own NDArray loader (no pickle)."""
        model.net.load_parameters(str(path), ctx=model.ctx)
        return model
