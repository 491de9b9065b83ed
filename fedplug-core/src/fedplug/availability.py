"""Whether a backend can run here: found among the installed plugins, its framework installed and working.

The one place where fedplug's commands and ``fedplug.run()`` ask it, so that every engine
and every command answers the same way, in one line.
"""

from __future__ import annotations

from fedplug.backend import Backend, BackendUnavailable, Config, require_available
from fedplug.errors import ConfigError, UnavailableError
from fedplug.plugins import UnknownBackend, get_registry


def find_backend(name: str) -> Backend:
    """The installed backend ``name``; ConfigError (with what to install) if there is none."""
    try:
        return get_registry().get(name)
    except UnknownBackend as error:
        raise ConfigError(str(error)) from error


def check_backend_available(backend: Backend, config: Config | None = None) -> None:
    """The backend's own check (with the run config it would run, once resolved); a plugin that fails it
    with anything else is named in one line."""
    try:
        require_available(backend, config)
    except BackendUnavailable as error:
        raise UnavailableError(str(error)) from error
    except (Exception, SystemExit) as error:
        entry = get_registry().backends.get(backend.name)
        origin = f"plugin '{entry.plugin}' ({entry.distribution} {entry.version})" if entry else "its plugin"
        raise UnavailableError(
            f"backend '{backend.name}' from {origin} failed its availability check with "
            f"{type(error).__name__}: {error}; reinstall it or report this to its authors"
        ) from error
