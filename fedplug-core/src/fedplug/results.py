"""The results folder of a run: config, per-round metrics (JSON, CSV, PNG), final model.

Metrics are rewritten after every round, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import csv
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedplug.backend import Config, Weights

METRIC_COLUMNS = (
    "round",
    "train-nodes",
    "train-loss",
    "train-accuracy",
    "evaluate-nodes",
    "evaluate-loss",
    "evaluate-accuracy",
    "centralized-loss",
    "centralized-accuracy",
    "seconds",
)
progress_log = logging.getLogger("fedplug.progress")
"""Each finished round is logged here with ``extra={"record": {...}}``; the CLI shows it."""


def default_out(backend: str, root: Path = Path("fedplug-runs")) -> Path:
    return root / f"{datetime.now():%Y%m%d-%H%M%S}-{backend}"


class Results:
    """Writes one run's results folder."""

    def __init__(self, out: Path, config: Config) -> None:
        self.out = out
        self.rounds: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")

    def add_round(self, record: dict[str, Any]) -> None:
        self.rounds.append(record)
        write_metrics(self.out, self.rounds)
        progress_log.info("round %s finished", record["round"], extra={"record": record})

    def save_weights(self, weights: Weights) -> None:
        with open(self.out / "weights.npz", "wb") as file:
            np.savez(file, **weights)


def write_metrics(out: Path, rounds: list[dict[str, Any]]) -> None:
    (out / "metrics.json").write_text(json.dumps({"rounds": rounds}, indent=2) + "\n")
    with open(out / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rounds)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.json"
    return json.loads(path.read_text())["rounds"] if path.is_file() else []  # type: ignore[no-any-return]


def plot_metrics(out: Path, title: str = "") -> Path | None:
    """Draw loss and accuracy per round into ``metrics.png``; None if there is nothing to draw."""
    rounds = read_metrics(out)
    if not rounds:
        return None
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
    figure.tight_layout()
    path = out / "metrics.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
