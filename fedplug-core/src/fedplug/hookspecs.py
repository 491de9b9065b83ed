"""The whole plugin contract of fedplug: one hook, register-callback style."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fedplug.backend import Backend

PROJECT_NAME = "fedplug"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def fedplug_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backends by calling ``register(backend)`` once per backend."""
