"""fedplug: framework-agnostic federated learning on Flower, one backend plugin per framework."""

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
    Weights,
)
from fedplug.errors import ConfigError, DeployError, FedplugError, RunError, UnavailableError  # noqa: E402
from fedplug.hookspecs import hookimpl  # noqa: E402
from fedplug.version import __version__  # noqa: E402

if TYPE_CHECKING:
    from fedplug.api import RunResult, run

_API = {"run", "RunResult"}
"""Names of fedplug's Python API, imported on first use: ``import fedplug`` stays light for plugins and the CLI."""


def __getattr__(name: str) -> object:
    if name in _API:
        from fedplug import api

        return getattr(api, name)
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
    "RunError",
    "RunResult",
    "UnavailableError",
    "Weights",
    "__version__",
    "hookimpl",
    "run",
]
