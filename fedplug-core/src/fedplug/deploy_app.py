"""The ServerApp that ``fedplug run --superlink`` submits to a SuperLink.

It is fedplug's ServerApp (``fedplug.apps:server_app``) plus structured status lines on
standard output (``fedplug.status_lines``): where its results go, one line per finished
round, and how the run ended and why. Flower forwards a ServerApp's output to the
SuperLink's log stream, so the machine that submitted the run shows the same live progress
and summary as a simulation, wherever the SuperLink is.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedplug.apps import main as fedplug_main
from fedplug.errors import one_line
from fedplug.results import default_out, progress_log
from fedplug.rounds import RunFailed
from fedplug.status_lines import format_line


class ProgressLines(logging.Handler):
    """Prints each finished round as a ``fedplug-progress`` line."""

    def emit(self, record: logging.LogRecord) -> None:
        print(format_line("progress", record.record), flush=True)  # type: ignore[attr-defined]


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run fedplug's ServerApp; report where its results go, every finished round and how it ended."""
    if not context.run_config.get("out"):
        context.run_config["out"] = str(default_out(str(context.run_config.get("backend", "numpy"))))
    out = Path(str(context.run_config["out"])).expanduser().resolve()
    context.run_config["out"] = str(out)
    print(format_line("results", {"out": str(out)}), flush=True)
    handler = ProgressLines()
    progress_log.addHandler(handler)
    progress_log.setLevel(logging.INFO)
    try:
        fedplug_main(grid, context)
    except BaseException as error:
        reason = str(error) if isinstance(error, RunFailed) else f"{type(error).__name__}: {error}"
        print(format_line("status", {"status": "failed", "reason": one_line(reason)}), flush=True)
        raise
    else:
        print(format_line("status", {"status": "finished", "reason": ""}), flush=True)
    finally:
        progress_log.removeHandler(handler)
        sys.stdout.flush()
