"""What a backend is: a light object that names a framework and the operations the core calls.

A backend module must import no ML framework at import time: everything heavy is
imported inside the operations, the first time the backend is used.
"""

from __future__ import annotations

import abc
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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


class BackendUnavailable(RuntimeError):
    """The backend's framework is missing or cannot run on this machine."""


class ModelError(ValueError):
    """A model cannot be built for this data spec or run config."""


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


@dataclass(frozen=True)
class Framework:
    """The framework a backend needs: its import name and a pip requirement."""

    import_name: str
    requirement: str

    def is_installed(self) -> bool:
        """Whether the framework can be found, without importing it."""
        try:
            return importlib.util.find_spec(self.import_name) is not None
        except (ImportError, ValueError):
            return False


class Backend(abc.ABC):
    """Base class of every backend; subclasses fill in the class attributes and operations.

    Data reaches ``train``, ``evaluate`` and ``predict`` as ``x``: float32 images
    ``(N, C, H, W)`` scaled to ``[0, 1]``, and ``y``: int64 labels ``(N,)``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    framework: ClassVar[Framework]
    models: ClassVar[tuple[str, ...]] = ("mlp", "lenet")
    defaults: ClassVar[Mapping[str, Scalar]] = {}
    """Run-config defaults of this backend, over the core's (see ``fedplug.config``)."""
    quickstart_dataset: ClassVar[str | None] = None
    """Hugging Face id of the dataset of the Flower quickstart this backend reproduces."""
    file_suffix: ClassVar[str]
    """Suffix of the framework's native model file, e.g. ``.pt``."""
    notice: ClassVar[str] = ""
    """Said once to users (``fedplug info`` and the first ``fedplug run``), if set."""
    unsupported: ClassVar[frozenset[str]] = frozenset()
    """Run-config keys or features this backend cannot honour, e.g. ``{"proximal-mu"}``.

    The core refuses a run that needs one of them, in one line, before anything starts:
    ``"proximal-mu"`` refuses ``--strategy fedprox``; any other key refuses a run config that
    sets it to a non-zero value. Never ignore a key silently: declare it here instead.
    """

    def check_available(self) -> None:
        """Raise ``BackendUnavailable`` with an install hint if the framework cannot run here."""
        if not self.framework.is_installed():
            raise BackendUnavailable(
                f"backend '{self.name}' needs {self.framework.import_name}: pip install '{self.framework.requirement}'"
            )

    def check_config(self, config: Config) -> None:
        """Check the backend's own run-config keys; raise ``fedplug.config.ConfigError``. Default: no check."""
        return None

    def environment(self, config: Config) -> dict[str, str]:
        """Environment variables the framework must see before anything imports it.

        The simulation sets them before Flower starts, so Ray's workers inherit them
        (Keras, for one, reads ``KERAS_BACKEND`` once, at import). Default: none.
        """
        return {}

    @abc.abstractmethod
    def build_model(self, model: str, spec: DataSpec, config: Config) -> Any:
        """Build model ``model`` (one of ``self.models``) for ``spec``, seeded by ``config['seed']``."""

    @abc.abstractmethod
    def get_weights(self, model: Any) -> Weights:
        """Return the model's weights in the canonical layout (fresh numpy arrays)."""

    @abc.abstractmethod
    def set_weights(self, model: Any, weights: Weights) -> None:
        """Load canonical weights into the model."""

    @abc.abstractmethod
    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """Train locally for ``config['local-epochs']``; return at least ``loss`` and ``num-examples``."""

    @abc.abstractmethod
    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """Return ``loss``, ``accuracy`` and ``num-examples`` on ``(x, y)``."""

    @abc.abstractmethod
    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Return class scores ``(N, num_classes)`` as a numpy array."""

    @abc.abstractmethod
    def save(self, model: Any, path: Path) -> None:
        """Save the model in the framework's native format at ``path`` (ends in ``file_suffix``)."""

    @abc.abstractmethod
    def load(self, model: Any, path: Path) -> Any:
        """Load a file written by ``save`` into a model built like ``model``; return it.

        Must not use unsafe deserialization (pickle).
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
