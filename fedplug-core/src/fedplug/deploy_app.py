"""The ServerApp that ``fedplug run --superlink`` submits to a SuperLink.

It is fedplug's ServerApp (``fedplug.apps:server_app``) plus structured status lines on
standard output (``fedplug.status_lines``): where its results go, one line per finished
round, and how the run ended and why. Flower forwards a ServerApp's output to the
SuperLink's log stream, so the machine that submitted the run shows the same live progress
and summary as a simulation, wherever the SuperLink is.

Its Grid is Flower's (the Deployment Engine's ``HttpGrid``) behind :class:`PromptGrid`, which
pulls replies at a short, adaptive interval instead of every 3 s: see ``docs/deploy.md``,
"What a round costs".
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
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


class PromptGrid(Grid):
    """A Grid that waits for replies the way Flower's does, but looks for them every few ms, not every 3 s.

    Flower's Deployment Engine Grid (``HttpGrid.send_and_receive``) pulls replies from the
    SuperLink and then sleeps 3 s whenever some are missing: each exchange of a round waits
    1.5 s on average after its last reply arrived. This one pulls after ``shortest`` seconds,
    then waits 1.5 times longer after each pull that brought nothing, up to ``longest``, and
    again ``shortest`` after one that brought a reply (replies come in bursts: the nodes of a
    round finish together). Everything else is the wrapped Grid's, through Flower's public
    ``Grid`` methods only.
    """

    def __init__(self, grid: Grid, shortest: float = 0.02, longest: float = 0.5) -> None:
        self.grid, self.shortest, self.longest = grid, shortest, longest
        self.pulls = 0
        """Pulls made by ``send_and_receive`` (for tests and profiles)."""

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; pull their replies until all arrived or ``timeout`` seconds passed (None: no limit)."""
        pending = {message_id for message_id in self.push_messages(messages) if message_id}
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = self.shortest
        while pending:
            pulled = list(self.pull_messages(sorted(pending)))
            self.pulls += 1
            replies.extend(pulled)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in pulled)
            interval = self.shortest if pulled else min(self.longest, interval * 1.5)
            if not pending:
                break
            left = float("inf") if end is None else end - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(interval, left))
        return replies


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
        fedplug_main(PromptGrid(grid), context)
    except BaseException as error:
        reason = str(error) if isinstance(error, RunFailed) else f"{type(error).__name__}: {error}"
        print(format_line("status", {"status": "failed", "reason": one_line(reason)}), flush=True)
        raise
    else:
        print(format_line("status", {"status": "finished", "reason": ""}), flush=True)
    finally:
        progress_log.removeHandler(handler)
        sys.stdout.flush()
