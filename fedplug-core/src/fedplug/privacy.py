"""fedplug never phones home: telemetry is switched off in every process that imports it.

Flower and flwr-datasets read ``FLWR_TELEMETRY_ENABLED`` when they are imported (and,
when it is on, write a persistent id to ``~/.flwr/source``); Ray reads
``RAY_USAGE_STATS_ENABLED`` when it starts. ``import fedplug`` sets them first, so the
``fedplug`` command, the simulation process, Ray's workers (which inherit the environment)
and ClientApps on the Deployment Engine all run with telemetry off.
"""

from __future__ import annotations

import os

NO_TELEMETRY_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def switch_off_telemetry() -> None:
    """Set the variables that switch off Flower's, Ray's and Hugging Face's telemetry."""
    os.environ.update(NO_TELEMETRY_ENV)


def no_flwr_datasets_source_id() -> None:
    """Keep flwr-datasets from writing a persistent id to ``~/.flwr/source`` (see :mod:`fedplug.flower_adapter`).

    Call this before using ``FederatedDataset``.
    """
    from fedplug import flower_adapter

    flower_adapter.no_flwr_datasets_source_id()


def no_flower_source_id() -> None:
    """Keep Flower from writing a persistent id to ``$FLWR_HOME/source`` (see :mod:`fedplug.flower_adapter`)."""
    from fedplug import flower_adapter

    flower_adapter.no_flower_source_id()
