"""The shared models as ``torch.nn.Module``s whose ``state_dict`` is the canonical layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedplug import Config, DataSpec, ModelError
from fedplug.toolkit import BN_EPS, BN_MOMENTUM, NORM_PREFIX, canonical_shapes, check_custom_model
from fedplug_torch.framework import F, nn, torch


class SharedNet(nn.Module):
    """Convs (each ReLU then 2x2 pool), a flatten, then dense layers with ReLU between.

    Only parametrised layers live in ``layers``; activations, pooling and the flatten
    are applied in ``forward``, so ``state_dict()`` keys are ``layers.<i>.weight`` /
    ``layers.<i>.bias`` in canonical order. ``mlp`` is the case without convs; ``lenet``
    (with max pooling, the Flower PyTorch quickstart's CNN) has two. ``lenet-bn`` adds a
    ``BatchNorm2d`` after each conv (before its ReLU), in ``norm``, registered first so that its
    ``norm.<i>.*`` keys come first, as the canonical order has them (``num_batches_tracked`` stays out:
    ``native_names``).
    """

    def __init__(self, model: str, spec: DataSpec, config: Config) -> None:
        super().__init__()
        shapes = canonical_shapes(model, spec, config)
        norms = [shape[0] for name, shape in shapes.items() if name.startswith(NORM_PREFIX) and name.endswith("mean")]
        self.norm = nn.ModuleList(nn.BatchNorm2d(out, eps=BN_EPS, momentum=BN_MOMENTUM) for out in norms)
        weights = [shape for name, shape in shapes.items() if name.endswith(".weight") and name.startswith("layers.")]
        self.layers = nn.ModuleList(
            nn.Conv2d(shape[1], shape[0], shape[2:], bias=not self.norm)
            if len(shape) == 4
            else nn.Linear(shape[1], shape[0])
            for shape in weights
        )
        self.pool = F.avg_pool2d if config.get("pool", "max") == "avg" else F.max_pool2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.Conv2d):
                x = layer(x)
                if i < len(self.norm):
                    x = self.norm[i](x)
                x = self.pool(F.relu(x), 2)
                continue
            x = layer(x.flatten(1))
            if i < last:
                x = F.relu(x)
        return x


def build(model: str, spec: DataSpec, config: Config, device: torch.device) -> SharedNet:
    """Build ``model`` with PyTorch's default init from ``config['seed']``, on ``device``.

    Parameters are drawn on the CPU from a forked RNG, so the global RNG is untouched
    and the initial weights do not depend on the device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("seed", 0)))
        net = SharedNet(model, spec, config)
    return net.to(device)


def build_custom(make: Callable[[], Any], config: Config, device: torch.device) -> nn.Module:
    """The user's ``nn.Module``, built from a forked RNG seeded with ``config['seed']``, on ``device``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("seed", 0)))
        net = check_custom_model(make(), nn.Module, "a torch.nn.Module", config)
    if not any(True for _ in net.parameters()):
        raise ModelError(f"custom model {config['model']} has no parameters to train")
    return net.to(device)


def native_names(net: nn.Module) -> list[str]:
    """The ``state_dict`` keys that travel: parameters and float buffers (BatchNorm's running statistics).

    Integer buffers (``num_batches_tracked``) are each node's own counters and stay on the node.
    """
    return [name for name, value in net.state_dict().items() if value.is_floating_point()]
