"""Training, evaluation and prediction loops with the whole partition on the device."""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from fedplug.backend import Config
from fedplug.runtime import cpu_share

EVAL_BATCH = 1024
"""Rows per forward pass in ``evaluate`` and ``predict`` (no gradients, so larger)."""


@cache
def device() -> torch.device:
    """CUDA (or ROCm) if present, else Apple's MPS, else the CPU; sizes torch's threads once."""
    torch.set_num_threads(cpu_share())
    with warnings.catch_warnings():  # a broken driver warns while probing
        warnings.simplefilter("ignore")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
    return torch.device("cpu")


def to_device(array: np.ndarray, dtype: npt.DTypeLike, target: torch.device) -> torch.Tensor:
    """Copy a numpy array to ``target`` in one transfer (a read-only array is copied first)."""
    array = np.ascontiguousarray(array, dtype=dtype)
    tensor = torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
    return tensor.to(target)


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
    """SGD with momentum on cross-entropy for ``local-epochs`` epochs, as the quickstart trains.

    A FedProx ``proximal-mu`` in the config adds ``mu / 2 * ||w - w_round||^2`` to the
    objective (not to the reported loss).
    """
    target = next(net.parameters()).device
    inputs, labels = to_device(x, np.float32, target), to_device(y, np.int64, target)
    optimizer = torch.optim.SGD(net.parameters(), lr=float(config["lr"]), momentum=float(config.get("momentum", 0.0)))
    mu = float(config.get("proximal-mu", 0.0))
    anchor = [p.detach().clone() for p in net.parameters()] if mu > 0 else []
    batch_size, epochs = int(config["batch-size"]), int(config["local-epochs"])
    seed = int(config.get("seed", 0)) + int(config.get("server-round", 0))
    generator = torch.Generator().manual_seed(seed)
    loss_sum = torch.zeros((), device=target)
    correct = torch.zeros((), dtype=torch.int64, device=target)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(target)
        for batch in torch.split(order, batch_size):
            logits = net(inputs[batch])
            loss = F.cross_entropy(logits, labels[batch])
            objective = loss
            if mu > 0:
                objective = loss + mu / 2 * sum((p - a).square().sum() for p, a in zip(net.parameters(), anchor))
            optimizer.zero_grad(set_to_none=True)
            objective.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
            correct += (logits.detach().argmax(1) == labels[batch]).sum()
    seen = len(labels) * epochs
    return {
        "loss": loss_sum.item() / seen,
        "accuracy": correct.item() / seen,
        "num-examples": len(labels),
    }


@torch.inference_mode()
def evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean cross-entropy and accuracy on ``(x, y)``."""
    target = next(net.parameters()).device
    inputs, labels = to_device(x, np.float32, target), to_device(y, np.int64, target)
    net.eval()
    loss_sum = torch.zeros((), device=target)
    correct = torch.zeros((), dtype=torch.int64, device=target)
    for chunk, chunk_labels in zip(torch.split(inputs, EVAL_BATCH), torch.split(labels, EVAL_BATCH)):
        logits = net(chunk)
        loss_sum += F.cross_entropy(logits, chunk_labels, reduction="sum")
        correct += (logits.argmax(1) == chunk_labels).sum()
    return {
        "loss": loss_sum.item() / len(labels),
        "accuracy": correct.item() / len(labels),
        "num-examples": len(labels),
    }


@torch.inference_mode()
def predict(net: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits ``(N, classes)`` as float32 numpy."""
    target = next(net.parameters()).device
    net.eval()
    inputs = to_device(x, np.float32, target)
    return torch.cat([net(chunk) for chunk in torch.split(inputs, EVAL_BATCH)]).cpu().numpy()
