"""The values every layer shares: run-config scalars, the run config, canonical weights, the data spec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Scalar = bool | int | float | str
Config = Mapping[str, Scalar]
"""A flat run config, as Flower passes it: kebab-case keys, scalar values."""

Weights = dict[str, np.ndarray]
"""Canonical weights: ordered ``layers.<i>.weight`` / ``layers.<i>.bias`` -> array.

Dense weights are ``(out, in)``, conv weights ``(out_ch, in_ch, kh, kw)``, biases
``(out,)``; ``<i>`` counts the layers that hold parameters, from 0. A flattened
feature vector is in channels-first ``(C, H, W)`` order, as in PyTorch.
"""


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: image shape ``(C, H, W)`` and classes."""

    input_shape: tuple[int, int, int]
    num_classes: int

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))
