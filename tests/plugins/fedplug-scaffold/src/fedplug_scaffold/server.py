"""The server side of SCAFFOLD: a Flower FedAvg that sends the control variate c and updates it."""

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg


def _numpy(record):
    return OrderedDict((key, array.numpy()) for key, array in record.items())


def _record(arrays):
    return ArrayRecord(OrderedDict((key, Array(np.ascontiguousarray(value))) for key, value in arrays.items()))


class ScaffoldStrategy(FedAvg):
    """x <- x + server_lr * (weighted mean of y_i - x);  c <- c + mean of delta c_i (every sampled node)."""

    def __init__(self, *, server_lr=1.0, **kwargs):
        super().__init__(**kwargs)
        self.server_lr = server_lr
        self.current_arrays = None  # the round's global model x
        self.control = None  # the server control variate c, by weight name

    def configure_train(self, server_round, arrays, config, grid):
        self.current_arrays = arrays
        if self.control is None:
            self.control = {key: np.zeros_like(value) for key, value in _numpy(arrays).items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content["control"] = _record(self.control)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        deltas = []
        for reply in replies:
            if not reply.has_error() and "control" in reply.content.array_records:
                deltas.append(_numpy(reply.content.array_records["control"]))
                del reply.content["control"]  # FedAvg aggregates one ArrayRecord per reply
        aggregated, metrics = super().aggregate_train(server_round, replies)
        if aggregated is None or self.current_arrays is None:
            return aggregated, metrics
        x, mean = _numpy(self.current_arrays), _numpy(aggregated)
        stepped = {key: (x[key] + self.server_lr * (mean[key] - x[key])).astype(x[key].dtype) for key in x}
        if deltas:
            self.control = {
                key: (self.control[key] + np.mean([delta[key] for delta in deltas], axis=0)).astype(c.dtype)
                for key, c in self.control.items()
            }
        return _record(stepped), metrics
