"""fedplug: framework-agnostic federated learning on Flower, one backend plugin per framework."""

from importlib.metadata import PackageNotFoundError, version

from fedplug.backend import (
    Backend,
    BackendUnavailable,
    Config,
    DataSpec,
    Framework,
    ModelError,
    Weights,
)
from fedplug.hookspecs import hookimpl

try:
    __version__ = version("fedplug-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Config",
    "DataSpec",
    "Framework",
    "ModelError",
    "Weights",
    "__version__",
    "hookimpl",
]
