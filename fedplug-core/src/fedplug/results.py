"""The results folder of a run: config, per-round metrics (JSON, CSV, PNG), weights, status and timeline.

Metrics are rewritten after every round, so an interrupted run keeps what it finished.
Every file is written to a temporary name and renamed, so a kill at any instant leaves
each file either complete or as it was. JSON is strict: non-finite numbers become null.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedplug.backend import Config, Weights
from fedplug.errors import one_line

METRIC_COLUMNS = (
    "round",
    "train-nodes",
    "train-failed",
    "train-loss",
    "train-accuracy",
    "evaluate-nodes",
    "evaluate-failed",
    "evaluate-loss",
    "evaluate-accuracy",
    "personal-loss",  # personalised strategies (fedplug.personal): the nodes' personal models
    "personal-accuracy",
    "centralized-loss",
    "centralized-accuracy",
    "seconds",
    "train-slowest-seconds",
    "evaluate-slowest-seconds",
    "compute-seconds",
    "epsilon",  # differential privacy (fedplug.dp): the budget spent after the round
    "delta",
)
progress_log = logging.getLogger("fedplug.progress")
"""Each finished round is logged here with ``extra={"record": {...}}``; the CLI shows it."""


def default_out(backend: str, root: Path = Path("fedplug-runs")) -> Path:
    """A new folder ``root/<time>-<backend>``, made now so that runs started together never share one."""
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{backend}"
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        out = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            out.mkdir()  # atomic: exactly one process gets each name
            return out
        except FileExistsError:
            continue
    raise FileExistsError(f"too many runs named {stem} in {root}")


def out_problem(text: str) -> str | None:
    """Why ``--out TEXT`` names no results folder, or None.

    An empty ``--out ''`` (a shell variable that was not set) would become the current folder,
    and the run would write its files among the user's own: it is refused by name instead.
    The CLI checks the text as typed, before it becomes a ``Path`` (where ``''`` reads as ``.``).
    """
    if not text.strip():
        return "--out is empty: give the results folder a name (or leave --out out for a new one)"
    return None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def strict_json(value: Any) -> str:
    """JSON that strict parsers accept: NaN and infinities become null."""
    return json.dumps(_finite(value), indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file and a rename: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    named: dict[str, Any] = dict(arrays)
    np.savez(buffer, **named)
    write_atomic(path, buffer.getvalue())


class Results:
    """Writes one run's results folder."""

    def __init__(self, out: Path, config: Config, rounds: list[dict[str, Any]] | None = None) -> None:
        self.out = out
        self.rounds: list[dict[str, Any]] = list(rounds or [])
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.json", strict_json(dict(config)))
        if rounds is not None:
            write_metrics(out, self.rounds)

    def add_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        write_metrics(self.out, self.rounds)
        progress_log.info("round %s finished", record["round"], extra={"record": record})

    def save_weights(self, weights: Weights) -> None:
        save_npz(self.out / "weights.npz", weights)

    def mark(self, event: str, at: float | None = None) -> None:
        mark(self.out, event, at)


def mark(out: Path, event: str, at: float | None = None) -> None:
    """Record when ``event`` happened (wall clock, now by default) in ``out/timeline.json``.

    The start-up and shutdown steps of a run, for ``benchmarks/``: written by the simulation
    process and its ServerApp (one writer at a time), a later event of the same name replaces it.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "timeline.json"
    try:
        events = json.loads(path.read_text())
    except (OSError, ValueError):
        events = {}
    events[event] = time.time() if at is None else at
    write_atomic(path, strict_json(events))


def write_metrics(out: Path, rounds: list[dict[str, Any]]) -> None:
    write_atomic(out / "metrics.json", strict_json({"rounds": rounds}))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rounds)
    write_atomic(out / "metrics.csv", text.getvalue())


def failure_summary(rounds: list[dict[str, Any]]) -> list[str]:
    """Distinct failure reasons of a run, most frequent first: ``3 nodes: train raised ValueError: ...``."""
    counts: dict[str, set[tuple[str, int]]] = {}
    for record in rounds:
        for failure in record.get("unusable-nodes", []):  # nodes that could not even say which partition they hold
            counts.setdefault(failure["reason"], set()).add(("node", failure["node"]))
        for kind in ("train", "evaluate"):
            for failure in record.get(f"{kind}-failures", []):
                counts.setdefault(failure["reason"], set()).add(("partition", failure["partition"]))
    ranked = sorted(counts.items(), key=lambda item: (-len(item[1]), item[0]))
    return [f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: {reason}" for reason, nodes in ranked]


def write_status(out: Path, status: str, reason: str = "") -> None:
    """How the run ended (``finished``, ``failed``, ``interrupted``) and why, for the CLI to report.

    The reason is the CLI's last line: one printable line of at most ``MESSAGE_LIMIT`` characters
    (the full error is in ``simulation.log``).
    """
    write_atomic(out / "status.json", strict_json({"status": status, "reason": one_line(reason)}))


def read_status(out: Path) -> dict[str, str]:
    try:
        return json.loads((out / "status.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.json"
    return json.loads(path.read_text())["rounds"] if path.is_file() else []


def prepare_plotting() -> threading.Thread:
    """Import matplotlib and draw a first figure (half a second) in a background thread, so that :func:`plot_metrics`
    at the end of a run does not wait for it. Returns the thread."""

    def load() -> None:
        try:  # imports, fonts, first draw: a head start only; the run's own plot reports any real failure
            draw_metrics([{"round": 0, "train-loss": 1.0, "train-accuracy": 0.5}], "")
        except Exception:
            logging.getLogger("fedplug.results").debug("matplotlib's warm-up failed", exc_info=True)

    thread = threading.Thread(target=load, name="fedplug-import-matplotlib", daemon=True)
    thread.start()
    return thread


def finish_results(out: Path, title: str) -> None:
    """The end of a finished run's results: the plot (drawn from ``metrics.json``, already on disk), then status
    ``finished``, which says that every result file, the plot included, is written."""
    plot_metrics(out, title)
    write_status(out, "finished")


def plot_metrics(out: Path, title: str = "") -> Path | None:
    """Draw loss and accuracy per round into ``metrics.png``; None if there is nothing to draw."""
    rounds = read_metrics(out)
    if not rounds:
        return None
    path = out / "metrics.png"
    write_atomic(path, draw_metrics(rounds, title))
    return path


_PLOTTING = threading.Lock()
"""pyplot is not thread-safe: one figure at a time (the warm-up of :func:`prepare_plotting`, then the run's)."""


def draw_metrics(rounds: list[dict[str, Any]], title: str) -> bytes:
    """The PNG of :func:`plot_metrics`."""
    with _PLOTTING:
        return _draw(rounds, title)


MARGINS = {"left": 0.07, "right": 0.98, "bottom": 0.12, "top": 0.9, "wspace": 0.22}
"""The plot's margins (fractions of its 10 x 4 inches): room for the axis labels, tick labels and title."""


def _draw(rounds: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("train", "o-"), ("evaluate", "s-"), ("centralized", "^-")):
        for axis, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            points = [(r["round"], r[f"{kind}-{metric}"]) for r in rounds if r.get(f"{kind}-{metric}") is not None]
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, style, label=kind)
    for axis, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    # fixed margins instead of tight_layout(), which draws every tick label once more to measure it (a third of the
    # drawing's time): room for tick labels such as 0.25 or 2500 (matplotlib puts larger scales above the axis)
    figure.subplots_adjust(**MARGINS)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
