"""The whole plugin contract of fedplug: two hooks, register-callback style (backends, strategies)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fedplug.backend import Backend
    from fedplug.strategy_contract import Strategy

PROJECT_NAME = "fedplug"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def fedplug_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backends by calling ``register(backend)`` once per backend."""


@hookspec
def fedplug_register_strategies(register: Callable[[Strategy], None]) -> None:
    """Register strategies by calling ``register(strategy)`` once per ``fedplug.Strategy`` descriptor."""
