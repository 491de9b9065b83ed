"""fedplug: framework-agnostic federated learning on Flower, one backend plugin per framework.

``__all__`` and ``fedplug.toolkit`` are the whole API a backend may import.
"""

from importlib.metadata import PackageNotFoundError, version

from fedplug.privacy import switch_off_telemetry

switch_off_telemetry()  # first: before anything can import Flower, flwr-datasets or Ray

from fedplug.backend import (  # noqa: E402
    Backend,
    BackendUnavailable,
    Config,
    DataSpec,
    Framework,
    Implementation,
    ModelError,
    Scalar,
    Weights,
)
from fedplug.config import ConfigError  # noqa: E402
from fedplug.hookspecs import hookimpl  # noqa: E402

try:
    __version__ = version("fedplug-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Config",
    "ConfigError",
    "DataSpec",
    "Framework",
    "Implementation",
    "ModelError",
    "Scalar",
    "Weights",
    "__version__",
    "hookimpl",
]
