"""fedplug never phones home: telemetry is switched off in every process that imports it.

Flower and flwr-datasets read ``FLWR_TELEMETRY_ENABLED`` when they are imported (and,
when it is on, write a persistent id to ``~/.flwr/source``); Ray reads
``RAY_USAGE_STATS_ENABLED`` when it starts. ``import fedplug`` sets them first, so the
``fedplug`` command, the simulation process, Ray's workers (which inherit the environment)
and ClientApps on the Deployment Engine all run with telemetry off.
"""

from __future__ import annotations

import os
from typing import Any

NO_TELEMETRY_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def switch_off_telemetry() -> None:
    """Set the variables that switch off Flower's, Ray's and Hugging Face's telemetry."""
    os.environ.update(NO_TELEMETRY_ENV)


def no_flwr_datasets_source_id() -> None:
    """Keep flwr-datasets from writing a persistent id to ``~/.flwr/source``.

    flwr-datasets builds each telemetry event, and so reads or creates ``~/.flwr/source``,
    before it looks at ``FLWR_TELEMETRY_ENABLED`` (it never sends the event when that is
    0). Giving it a source id first means it never touches ``~/.flwr``. Call this before
    using ``FederatedDataset``.
    """
    from flwr_datasets.common import telemetry

    _give_source_id(telemetry.state)


def no_flower_source_id() -> None:
    """Keep Flower from writing a persistent id to ``$FLWR_HOME/source``, as flwr-datasets above.

    Flower's exit event runs on a thread of its own that may outlive the simulation and
    recreate a removed ``FLWR_HOME``; with a source id given, it writes nothing.
    """
    from flwr.supercore import telemetry

    with telemetry.state_lock:
        _give_source_id(telemetry.state)


def _give_source_id(state: dict[str, Any]) -> None:
    # the one use of Flower's and flwr-datasets' private telemetry modules in fedplug
    if state.get("source") is None:
        state["source"] = "disabled"
