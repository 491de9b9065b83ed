"""The ServerApp that ``fedplug run --superlink`` submits to a SuperLink.

It is fedplug's ServerApp (``fedplug.apps:server_app``) plus one line per finished round
on standard output, ``fedplug-progress {json}``, and one line naming the results folder,
``fedplug-results {json}``. Flower forwards a ServerApp's output to the SuperLink's log
stream, so the machine that submitted the run reads the lines from ``flwr run --stream``
and shows the same live progress and summary as a simulation, wherever the SuperLink is.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedplug.results import default_out, progress_log

PROGRESS = "fedplug-progress "
RESULTS = "fedplug-results "


class ProgressLines(logging.Handler):
    """Prints each finished round as a ``fedplug-progress`` line."""

    def emit(self, record: logging.LogRecord) -> None:
        print(PROGRESS + json.dumps(record.record), flush=True)  # type: ignore[attr-defined]


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run fedplug's ServerApp; report where its results go and every finished round."""
    from fedplug.apps import server_app as fedplug_server_app

    if not context.run_config.get("out"):
        context.run_config["out"] = str(default_out(str(context.run_config.get("backend", "numpy"))))
    out = Path(str(context.run_config["out"])).expanduser().resolve()
    context.run_config["out"] = str(out)
    print(RESULTS + json.dumps({"out": str(out)}), flush=True)
    handler = ProgressLines()
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    try:
        fedplug_server_app(grid, context)
    finally:
        progress_log.removeHandler(handler)
        sys.stdout.flush()
