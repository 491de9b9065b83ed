"""The PyTorch implementation: training, evaluation and prediction with the whole partition on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedplug import Config, DataSpec, Implementation, Weights
from fedplug.toolkit import ADAM_BETAS, ADAM_EPS, EVAL_BATCH, TrainSettings, evaluation, metrics
from fedplug_torch import nets
from fedplug_torch.framework import F, device, nn, torch


def to_device(array: np.ndarray, dtype: npt.DTypeLike, target: torch.device) -> torch.Tensor:
    """Copy a numpy array to ``target`` in one transfer (a read-only array is copied first)."""
    array = np.ascontiguousarray(array, dtype=dtype)
    tensor = torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
    return tensor.to(target)


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """The contract's optimiser with zero state: ``torch.optim.SGD`` or ``Adam`` (the reference semantics)."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=settings.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=settings.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


class TorchImplementation(Implementation):
    """``nn.Module``s whose ``state_dict`` is the canonical layout, trained as the quickstart trains."""

    def build_model(self, model: str, spec: DataSpec, config: Config) -> nets.SharedNet:
        return nets.build(model, spec, config, device())

    def build_custom(self, make: Callable[[], Any], spec: DataSpec, config: Config) -> nn.Module:
        return nets.build_custom(make, config, device())

    def get_native_weights(self, model: nn.Module) -> Weights:
        """``state_dict`` entries under PyTorch's own names (``conv1.weight``, ``bn.running_mean``), float32."""
        state = model.state_dict()
        return {name: state[name].detach().cpu().numpy().astype(np.float32) for name in nets.native_names(model)}

    def set_native_weights(self, model: nn.Module, weights: Weights) -> None:
        tensors = {key: torch.from_numpy(np.array(value, np.float32)) for key, value in weights.items()}
        model.load_state_dict(tensors, strict=False)  # the core checked names and shapes; int buffers stay

    def get_weights(self, model: nn.Module) -> Weights:
        state = model.state_dict()
        return {key: state[key].cpu().numpy().copy() for key in nets.native_names(model)}

    def set_weights(self, model: nn.Module, weights: Weights) -> None:
        tensors = {key: torch.tensor(np.asarray(value, np.float32)) for key, value in weights.items()}
        missing, unexpected = model.load_state_dict(tensors, strict=False)  # lenet-bn's counters are not weights
        wrong = unexpected + [key for key in missing if not key.endswith("num_batches_tracked")]
        if wrong:
            raise KeyError(f"weights do not match the model: {wrong}")

    def train(self, model: nn.Module, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """The contract's optimiser (``torch.optim.SGD`` or ``Adam``, fresh every call) on cross-entropy,
        in the core's example order.

        A FedProx ``proximal-mu`` adds ``mu / 2 * ||w - w_round||^2`` to the objective (not to the reported loss).
        """
        settings = TrainSettings.from_config(config)
        target = next(model.parameters()).device
        inputs, labels = to_device(x, np.float32, target), to_device(y, np.int64, target)
        optimizer = make_optimizer(model, settings)
        mu = settings.proximal_mu
        anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
        loss_sum = torch.zeros((), device=target)
        correct = torch.zeros((), dtype=torch.int64, device=target)
        model.train()
        for epoch in range(settings.epochs):
            order = torch.from_numpy(settings.order(len(y), epoch)).to(target)
            for batch in torch.split(order, settings.batch_size):
                logits = model(inputs[batch])
                loss = F.cross_entropy(logits, labels[batch])
                objective = loss
                if mu > 0:
                    objective = loss + mu / 2 * sum((p - a).square().sum() for p, a in zip(model.parameters(), anchor))
                optimizer.zero_grad(set_to_none=True)
                objective.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                loss_sum += loss.detach() * len(batch)
                correct += (logits.detach().argmax(1) == labels[batch]).sum()
        return metrics(loss_sum.item(), correct.item(), len(y) * settings.epochs, len(y))

    def evaluate(self, model: nn.Module, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        return evaluation(self.predict(model, x), y)

    @torch.inference_mode()
    def predict(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        model.eval()
        inputs = to_device(x, np.float32, next(model.parameters()).device)
        return torch.cat([model(chunk) for chunk in torch.split(inputs, EVAL_BATCH)]).cpu().numpy()

    def save(self, model: nn.Module, path: Path) -> None:
        """A ``state_dict`` of tensors: ``torch.load(weights_only=True)`` reads it without unpickling code."""
        torch.save({key: value.cpu() for key, value in model.state_dict().items()}, path)

    def load(self, model: nn.Module, path: Path) -> nn.Module:
        model.load_state_dict(torch.load(path, weights_only=True, map_location=next(model.parameters()).device))
        return model
