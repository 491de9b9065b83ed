"""What the terminal shows: backend tables, live round rows, the run summary."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.table import Table

from fedplug.plugins import Registry, stdout_to_stderr

console = Console()


def backends_rows(registry: Registry) -> list[dict[str, Any]]:
    """One dict per backend and per broken plugin, as ``fedplug list --json`` prints them."""
    rows: list[dict[str, Any]] = []
    for name, entry in sorted(registry.backends.items()):
        framework = entry.backend.framework
        with stdout_to_stderr():  # finding a framework may import a package that prints
            installed = framework.is_installed()
        rows.append(
            {
                "name": name,
                "status": "ok",
                "distribution": entry.distribution,
                "version": entry.version,
                "framework": framework.import_name,
                "requirement": framework.requirement,
                "framework_installed": installed,
                "description": entry.backend.description,
            }
        )
    for broken in registry.broken:
        rows.append(
            {"name": broken.plugin, "status": "broken", "distribution": broken.distribution, "reason": broken.reason}
        )
    return rows


def backends_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="fedplug backends")
    for column in ("backend", "distribution", "framework", "installed", "description"):
        table.add_column(column)
    for row in rows:
        if row["status"] == "broken":
            table.add_row(row["name"], row["distribution"], "", "[red]broken[/]", f"[red]{row['reason']}[/]")
        else:
            installed = (
                "[green]yes[/]" if row["framework_installed"] else f"[yellow]no[/]: pip install '{row['requirement']}'"
            )
            table.add_row(
                row["name"], f"{row['distribution']} {row['version']}", row["framework"], installed, row["description"]
            )
    return table


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def round_line(record: dict[str, Any]) -> str:
    """``round 2 │ nodes 4 │ train 0.582 85.0% │ eval 0.467 88.3% │ server 0.435 88.9% │ 6.7 s``."""
    parts = [f"round {record['round']:>3}"]
    if "train-nodes" in record:
        nodes = f"nodes {record['train-nodes']}"
        if record.get("train-failed"):
            nodes += f"/{len(record['train-partitions'])} · {record['train-failed']} failed"
        if record.get("skipped"):
            nodes += " · skipped"
        if len(record.get("train-backends", {})) > 1:  # a mixed-framework round: nodes of each backend
            nodes += " (" + ", ".join(f"{name} {count}" for name, count in record["train-backends"].items()) + ")"
        parts.append(nodes)
    for kind, label in (("train", "train"), ("evaluate", "eval"), ("centralized", "server")):
        if f"{kind}-loss" in record:
            accuracy = record.get(f"{kind}-accuracy")
            parts.append(
                f"{label} {record[f'{kind}-loss']:.3f}" + (f" {accuracy:6.1%}" if accuracy is not None else "")
            )
    parts.append(f"{record['seconds']:.1f} s")
    return " │ ".join(parts)


class RoundPrinter(logging.Handler):
    """Prints each finished round as it is logged to ``fedplug.progress``."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(round_line(record.record), highlight=False, soft_wrap=True)  # type: ignore[attr-defined]


SUMMARY_COLUMNS = {
    "round": "round",
    "train-loss": "train loss",
    "train-accuracy": "train acc",
    "evaluate-loss": "eval loss",
    "evaluate-accuracy": "eval acc",
    "centralized-loss": "server loss",
    "centralized-accuracy": "server acc",
    "seconds": "s",
}


def summary_table(rounds: list[dict[str, Any]]) -> Table:
    table = Table(title="summary")
    columns = [c for c in SUMMARY_COLUMNS if any(c in r for r in rounds)]
    for column in columns:
        table.add_column(SUMMARY_COLUMNS[column], justify="right")
    for record in rounds:
        table.add_row(*(_fmt(record.get(c), 2 if c == "seconds" else 4) for c in columns))
    return table


def backends_line(rounds: list[dict[str, Any]]) -> str:
    """``backends: torch 0-1 · jax 2-3 · numpy 4-5`` for a run whose nodes ran several backends, else ``""``."""
    from fedplug.node_backends import compact

    ran: dict[int, str] = {}
    for record in rounds:
        ran.update({int(partition): name for partition, name in record.get("partition-backends", {}).items()})
    if len(set(ran.values())) < 2:
        return ""
    parts: dict[str, list[str]] = {}
    for entry in compact(ran).split(","):
        partitions, name = entry.split(":")
        parts.setdefault(name, []).append(partitions)
    return "backends: " + " · ".join(f"{name} {','.join(ids)}" for name, ids in parts.items())
