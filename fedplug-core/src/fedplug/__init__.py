"""fedplug: framework-agnostic federated learning on Flower, one backend plugin per framework.

``__all__`` and ``fedplug.toolkit`` are the whole API a backend may import.
"""

from typing import TYPE_CHECKING

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
from fedplug.errors import ConfigError, DeployError, FedplugError, RunError, UnavailableError  # noqa: E402
from fedplug.hookspecs import hookimpl  # noqa: E402
from fedplug.strategy_contract import Parameter, Strategy  # noqa: E402
from fedplug.version import __version__  # noqa: E402

if TYPE_CHECKING:
    from fedplug.api import RunResult, run
    from fedplug.capabilities import NodeStep
    from fedplug.numpy_backend import NumpyImplementation

_LAZY = {
    "run": "fedplug.api",
    "RunResult": "fedplug.api",
    "NumpyImplementation": "fedplug.numpy_backend",
    "NodeStep": "fedplug.capabilities",
}
"""Names imported on first use, so that ``import fedplug`` stays light for plugins and the CLI: the Python
API, the reference implementation a new backend starts from (``fedplug new-backend``), and what a
strategy's node step receives (``NodeStep``, it imports Flower)."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedplug' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BackendUnavailable",
    "Config",
    "ConfigError",
    "DataSpec",
    "DeployError",
    "FedplugError",
    "Framework",
    "Implementation",
    "ModelError",
    "NodeStep",
    "NumpyImplementation",
    "Parameter",
    "RunError",
    "RunResult",
    "Scalar",
    "Strategy",
    "UnavailableError",
    "Weights",
    "__version__",
    "hookimpl",
    "run",
]
