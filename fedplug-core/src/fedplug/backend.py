"""What a backend is: a light descriptor, and an implementation imported on first use.

The descriptor (a ``Backend`` subclass) names the framework, the models and the
defaults: all that ``fedplug list`` and the run checks need. Its ``implementation``
names, as ``"module:Class"``, the ``Implementation`` holding the eight operations; that
module may import the framework at its top, because fedplug imports it only when an
operation first runs. The core calls the operations on the descriptor, which forwards them.
"""

from __future__ import annotations

import abc
import functools
import importlib
import importlib.util
import inspect
import platform
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from packaging.requirements import InvalidRequirement, Requirement

from fedplug.custom import CustomModel, build_custom
from fedplug.errors import BackendUnavailable, ModelError
from fedplug.types import Config, DataSpec, Scalar, Weights

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Config",
    "CustomModel",
    "DataSpec",
    "Framework",
    "Implementation",
    "ModelError",
    "Scalar",
    "Weights",
    "require_available",
]

PLATFORM_NAMES = {"Darwin/arm64": "Apple silicon Macs", "Darwin": "macOS", "Linux": "Linux", "Windows": "Windows"}
"""How a ``Framework.platforms`` entry is said to users."""


@dataclass(frozen=True)
class Framework:
    """What a backend needs installed: its framework's import name and pip requirement, and more if it must.

    ``requirement`` is a PEP 508 requirement such as ``"torch>=2.2"`` or ``"mlx[cpu]"``;
    ``problem`` compares its specifiers with the installed distribution's version. ``also``
    holds further ``(import name, requirement)`` pairs checked the same way (JAX's ``flax``
    and ``optax``, MXNet's ``numpy<2``); ``platforms`` the ``platform.system()`` values, or
    ``"system/machine"`` pairs (``"Darwin/arm64"``), the framework runs on (empty: any); ``hint``
    the install command to show instead of ``pip install '<requirement>'``.
    """

    import_name: str
    requirement: str
    also: tuple[tuple[str, str], ...] = ()
    platforms: tuple[str, ...] = ()
    hint: str = ""

    @property
    def requirements(self) -> tuple[tuple[str, str], ...]:
        """Every ``(import name, requirement)`` to check, the framework's first."""
        return ((self.import_name, self.requirement), *self.also)

    def is_installed(self) -> bool:
        """Whether the framework can be found, without importing it."""
        return is_installed(self.import_name)

    def platform_problem(self) -> str | None:
        """Why the framework has no build for this OS and CPU, or None."""
        system, machine = platform.system(), platform.machine().lower()
        if not self.platforms or system in self.platforms or f"{system}/{machine}" in self.platforms:
            return None
        where = " and ".join(PLATFORM_NAMES.get(name, name) for name in self.platforms)
        return (
            f"cannot run here: {self.import_name} runs on {where}, not on {system or 'this system'} {machine}; "
            "use another backend (fedplug list)"
        )

    def problem(self) -> str | None:
        """Why the framework cannot be used (platform, not installed, wrong version) and the command that fixes it."""
        if reason := self.platform_problem():
            return reason
        for import_name, requirement in self.requirements:
            if reason := self._requirement_problem(import_name, requirement):
                return reason
        return None

    def _requirement_problem(self, import_name: str, requirement: str) -> str | None:
        try:
            wanted = Requirement(requirement)
        except InvalidRequirement as error:
            return f"declares a malformed requirement {requirement!r} ({error}): report it to the backend's authors"
        fix = self.hint or f"pip install '{requirement}'"
        if not is_installed(import_name):
            return f"needs {import_name}: {fix}"
        try:
            found = version(wanted.name)
        except PackageNotFoundError:
            return None  # a source build without metadata: trust it
        if wanted.specifier and not wanted.specifier.contains(found, prereleases=True):
            fix = self.hint or f"pip install -U '{requirement}'"
            return f"needs {requirement}, found {wanted.name} {found}: {fix}"
        return None


def is_installed(import_name: str) -> bool:
    """Whether module ``import_name`` can be found, without importing it."""
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


OPERATIONS = ("build_model", "get_weights", "set_weights", "train", "evaluate", "predict", "save", "load")
"""The operations the core calls, on the descriptor, which forwards them to the implementation."""
_LEGACY_SAID: set[str] = set()
LEGACY_REMOVAL = "0.3"
"""The fedplug release that removes the 0.1 backend contract."""


class Implementation(abc.ABC):
    """The operations of a backend; its module may import the framework at module level.

    Data reaches ``train``, ``evaluate`` and ``predict`` as ``x``: float32 images
    ``(N, C, H, W)`` scaled to ``[0, 1]``, and ``y``: int64 labels ``(N,)``. ``self.backend``
    is the descriptor (name, models, defaults). ``fedplug.toolkit`` holds the shared policies.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @abc.abstractmethod
    def build_model(self, model: str, spec: DataSpec, config: Config) -> Any:
        """Build model ``model`` (one of the backend's ``models``) for ``spec``, seeded by ``config['seed']``."""

    @abc.abstractmethod
    def get_weights(self, model: Any) -> Weights:
        """Return the model's weights in the canonical layout (fresh numpy arrays)."""

    @abc.abstractmethod
    def set_weights(self, model: Any, weights: Weights) -> None:
        """Load canonical weights into the model."""

    @abc.abstractmethod
    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """Train locally for ``config['local-epochs']``; return at least ``loss`` and ``num-examples``.

        Keep no state from one call to the next, and read every setting from this call's config.
        """

    @abc.abstractmethod
    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """Return ``loss``, ``accuracy`` and ``num-examples`` on ``(x, y)``."""

    @abc.abstractmethod
    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Return class scores (logits) ``(N, num_classes)`` as a numpy array."""

    @abc.abstractmethod
    def save(self, model: Any, path: Path) -> None:
        """Save the model in the framework's native format at ``path`` (ends in ``file_suffix``)."""

    @abc.abstractmethod
    def load(self, model: Any, path: Path) -> Any:
        """Load a file written by ``save`` into a model built like ``model``; return it. No pickle."""

    # -- custom models (optional: a backend that has them sets ``custom_models`` on its descriptor) --

    def build_custom(self, make: Callable[[], Any], spec: DataSpec, config: Config) -> Any:
        """Call ``make()`` (the user's factory) seeded from ``config['seed']``; check and prepare what it returns.

        Raise ``ModelError`` if it is not the framework's model type (say which type it must be);
        return the object the other operations take (e.g. the module moved to the device, a
        compiled Keras model). The core then checks its output shape on a dummy batch.
        """
        raise ModelError(f"backend '{self.backend.name}' cannot federate custom models")

    def get_native_weights(self, model: Any) -> Weights:
        """A custom model's weights under the framework's own names, in a stable order, as float32 arrays."""
        raise NotImplementedError

    def set_native_weights(self, model: Any, weights: Weights) -> None:
        """Load weights of ``get_native_weights``'s names and shapes (the core has checked them)."""
        raise NotImplementedError


class Backend:
    """Base class of every backend descriptor: class attributes, and the operations forwarded once, here.

    A subclass sets the class attributes and ``implementation``; ``Backend`` itself is not a
    backend and cannot be instantiated. Backends written against fedplug 0.1's contract (the
    operations defined on the ``Backend`` subclass itself) still work, with a
    ``DeprecationWarning``, until fedplug 0.3 removes that contract.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    framework: ClassVar[Framework]
    implementation: ClassVar[str] = ""
    """``"module:Class"`` of the backend's ``Implementation``, imported when an operation first runs."""
    models: ClassVar[tuple[str, ...]] = ("mlp", "lenet")
    defaults: ClassVar[Mapping[str, Scalar]] = {}
    """Run-config defaults of this backend, over the core's (see ``fedplug.config``)."""
    quickstart_dataset: ClassVar[str | None] = None
    """Hugging Face id of the dataset of the Flower quickstart this backend reproduces, if there is one."""
    file_suffix: ClassVar[str]
    """Suffix of the framework's native model file, e.g. ``.pt``."""
    notice: ClassVar[str] = ""
    """Said once to users (``fedplug info`` and the first ``fedplug run``), if set."""
    custom_models: ClassVar[str] = ""
    """What a custom model's factory must return, e.g. ``"a torch.nn.Module taking (N, C, H, W) ..."``.

    Empty: the backend federates only its own models, and the core refuses ``--model module:factory``.
    Set, the implementation provides ``build_custom``, ``get_native_weights`` and ``set_native_weights``.
    """
    unsupported: ClassVar[frozenset[str]] = frozenset()
    """Run-config keys or features this backend cannot honour, e.g. ``{"proximal-mu"}``.

    The core refuses a run that needs one of them, in one line, before anything starts:
    ``"proximal-mu"`` refuses ``--strategy fedprox``; any other key refuses a run config that
    sets it to a non-zero value; ``"key=value"`` refuses that value only (``"optimizer=adam"``).
    Never ignore a key silently: declare it here instead.
    """
    conformance: ClassVar[str] = "mixable"
    """The conformance tier the backend passes: ``"basic"`` (it works alone: ``fedplug.testing.BasicConformance``)
    or ``"mixable"`` (it can also join mixed federations: ``fedplug.testing.BackendConformance``).

    ``fedplug list`` and ``fedplug info`` show it; the suite checks the backend's tests run its tier.
    """
    presets: ClassVar[Mapping[str, Mapping[str, Scalar]]] = {}
    """Named sets of run-config values the backend ships, applied over its defaults and under the user's
    values (``fedplug run torch --preset quickstart``), e.g. ``{"quickstart": {...}}``: the Flower
    quickstart's exact settings, when the defaults differ. ``fedplug info`` lists them.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Backend:
        if cls is Backend:
            raise TypeError("fedplug.Backend is a base class: subclass it and set name, framework, models, ...")
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Warn once (``DeprecationWarning``) that a class defining all eight operations follows the 0.1 contract.

        Overriding a few operations of a backend to wrap its implementation (a test double) is fine.
        """
        super().__init_subclass__(**kwargs)
        where = f"{cls.__module__}.{cls.__qualname__}"
        if all(name in vars(cls) for name in OPERATIONS) and where not in _LEGACY_SAID:
            _LEGACY_SAID.add(where)
            warnings.warn(
                f"{where} defines the operations itself (the fedplug 0.1 backend contract, removed in fedplug "
                f"{LEGACY_REMOVAL}): move them to a fedplug.Implementation subclass in a module of their own "
                "and set implementation = 'module:Class' (see 'The backend' in fedplug's docs/plugins.md)",
                DeprecationWarning,
                stacklevel=2,  # the class statement
            )

    def check_available(self, config: Config | None = None) -> None:
        """Raise ``BackendUnavailable`` with an install hint if the framework cannot run here.

        ``config``, when given, is the run config the backend would run with: a backend whose
        needs depend on it (Keras's ``keras.backend``) checks those too. Call it through
        ``require_available``, which also serves overrides written without the parameter.
        """
        if problem := self.framework.problem():
            raise BackendUnavailable(f"backend '{self.name}' {problem}")

    def check_config(self, config: Config) -> None:
        """Check the backend's own run-config keys; raise ``fedplug.config.ConfigError``. Default: no check."""
        return None

    def environment(self, config: Config) -> dict[str, str]:
        """Environment variables the framework must see before anything imports it.

        The simulation sets them before Flower starts, so Ray's workers inherit them
        (Keras, for one, reads ``KERAS_BACKEND`` once, at import). Default: none.
        """
        return {}

    @functools.cached_property
    def impl(self) -> Implementation:
        """The ``Implementation`` named by ``implementation``, imported and built on first use.

        A framework that is installed but fails to import (a missing native library, a
        broken install) raises ``BackendUnavailable`` saying how to reinstall it.
        """
        module_name, _, class_name = self.implementation.partition(":")
        if not module_name or not class_name:
            raise TypeError(
                f"backend '{self.name}' must set implementation = 'module:Class', got {self.implementation!r}"
            )
        try:
            module = importlib.import_module(module_name)
        except (ImportError, OSError) as error:
            if problem := self.framework.problem():
                raise BackendUnavailable(f"backend '{self.name}' {problem}") from error
            try:
                importlib.import_module(self.framework.import_name)
            except (ImportError, OSError) as broken:
                raise BackendUnavailable(
                    f"backend '{self.name}': {self.framework.import_name} is installed but fails to import "
                    f"({type(broken).__name__}: {broken}): pip install --force-reinstall '{self.framework.requirement}'"
                ) from error
            raise  # the framework imports: the fault is the backend's own
        implementation: Implementation = getattr(module, class_name)(self)
        return implementation

    def build_model(self, model: str, spec: DataSpec, config: Config) -> Any:
        """Build model ``model`` (one of ``self.models``, or a custom ``module:factory``) for ``spec``, seeded."""
        if ":" in model:
            return build_custom(self, model, spec, config)
        return self.impl.build_model(model, spec, config)

    def get_weights(self, model: Any) -> Weights:
        """The model's weights in the canonical layout (a custom model's: under its own names)."""
        if isinstance(model, CustomModel):
            return self.impl.get_native_weights(model.net)
        return self.impl.get_weights(model)

    def set_weights(self, model: Any, weights: Weights) -> None:
        """Load canonical weights into the model (a custom model's own, checked against its layout)."""
        if isinstance(model, CustomModel):
            model.check(weights)
            self.impl.set_native_weights(model.net, weights)
            return
        self.impl.set_weights(model, weights)

    def train(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """Train locally; return at least ``loss`` and ``num-examples``."""
        return self.impl.train(_net(model), x, y, config)

    def evaluate(self, model: Any, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        """Return ``loss``, ``accuracy`` and ``num-examples`` on ``(x, y)``."""
        return self.impl.evaluate(_net(model), x, y, config)

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Class scores (logits) ``(N, num_classes)``."""
        return self.impl.predict(_net(model), x)

    def save(self, model: Any, path: Path) -> None:
        """Save the model in the framework's native format."""
        self.impl.save(_net(model), path)

    def load(self, model: Any, path: Path) -> Any:
        """Load a file written by ``save`` into a model built like ``model``."""
        if isinstance(model, CustomModel):
            return replace(model, net=self.impl.load(model.net, path))
        return self.impl.load(model, path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def require_available(backend: Backend, config: Config | None = None) -> None:
    """``backend.check_available(config)``; without ``config`` for an override that takes none (fedplug 0.1's)."""
    if config is not None and "config" in inspect.signature(backend.check_available).parameters:
        backend.check_available(config)
    else:
        backend.check_available()


def _net(model: Any) -> Any:
    """The framework's model object: a custom model's ``net``, or the model itself."""
    return model.net if isinstance(model, CustomModel) else model
