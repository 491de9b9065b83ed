"""What the terminal shows: backend and strategy tables and details, live round rows, the run summary."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from rich.console import Console
from rich.table import Table

from fedplug.backend import Backend, require_available
from fedplug.errors import ConfigError
from fedplug.plugins import Registry, stdout_to_stderr
from fedplug.strategy_contract import Strategy

console = Console()

TIERS = {"basic": "works alone", "mixable": "can join mixed federations"}
"""The conformance tiers a backend may declare (``Backend.conformance``), and what each promises."""


def named_prefix(description: str, name: str) -> re.Match[str] | None:
    """The backend's name at the start of its description (``"mything: ..."``), if it is there."""
    return re.match(rf"\s*{re.escape(name)}\s*[:\-\u2013\u2014]\s*", description, re.IGNORECASE)


def description_text(backend: Backend) -> str:
    """The backend's description as fedplug shows it after the name: without the name in front."""
    named = named_prefix(backend.description, backend.name)
    return backend.description[named.end() :] if named else backend.description


def availability(backend: Backend) -> str | None:
    """Why ``fedplug run NAME`` would refuse to start here with the backend's defaults, or None.

    It runs what the run runs before anything starts: ``check_available`` with the default run
    config and the run-config checks (``fedplug.config.resolve``). Neither imports the framework.
    """
    from fedplug.backend import BackendUnavailable
    from fedplug.config import defaults_for, resolve

    try:
        with stdout_to_stderr():  # finding a framework may import a package that prints
            require_available(backend, defaults_for(backend))
            resolve(backend, {})
    except (BackendUnavailable, ConfigError) as error:
        return str(error)
    except Exception as error:  # a plugin's own fault: say so rather than fail the whole listing
        return f"its check_available failed: {type(error).__name__}: {error}"
    return None


def tier_text(backend: Backend) -> str:
    """The backend's declared conformance tier, or what is wrong with the declaration."""
    tier = backend.conformance
    return tier if tier in TIERS else f"invalid: {tier!r} (use {' or '.join(map(repr, TIERS))})"


def backends_rows(registry: Registry) -> list[dict[str, Any]]:
    """One dict per backend and per broken plugin, as ``fedplug list --json`` prints them."""
    rows: list[dict[str, Any]] = []
    for name, entry in sorted(registry.backends.items()):
        framework = entry.backend.framework
        with stdout_to_stderr():  # finding a framework may import a package that prints
            installed = framework.is_installed()
        problem = availability(entry.backend)
        rows.append(
            {
                "name": name,
                "status": "ok",
                "distribution": entry.distribution,
                "version": entry.version,
                "framework": framework.import_name,
                "requirement": framework.requirement,
                "framework_installed": installed,
                "available": problem is None,
                "problem": problem,
                "conformance": tier_text(entry.backend),
                "description": description_text(entry.backend),
            }
        )
    for broken in registry.broken:
        rows.append(
            {"name": broken.plugin, "status": "broken", "distribution": broken.distribution, "reason": broken.reason}
        )
    return rows


def backends_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="fedplug backends")
    for column in ("backend", "distribution", "framework", "available", "tier", "description"):
        table.add_column(column)
    for row in rows:
        if row["status"] == "broken":
            table.add_row(row["name"], row["distribution"], "", "[red]broken[/]", "", f"[red]{row['reason']}[/]")
        else:
            available = "[green]yes[/]" if row["available"] else f"[yellow]no[/]: {row['problem']}"
            tier = row["conformance"] if row["conformance"] in TIERS else f"[red]{row['conformance']}[/]"
            table.add_row(
                row["name"],
                f"{row['distribution']} {row['version']}",
                row["framework"],
                available,
                tier,
                row["description"],
            )
    return table


def strategies_rows(registry: Registry) -> list[dict[str, Any]]:
    """One dict per strategy, as ``fedplug list --json`` prints them after the backends (``"kind": "strategy"``)."""
    rows: list[dict[str, Any]] = []
    for name, entry in registry.strategies.items():
        strategy = entry.strategy
        rows.append(
            {
                "name": name,
                "kind": "strategy",
                "status": "ok",
                "distribution": entry.distribution,
                "version": entry.version,
                "description": strategy.description,
                "parameters": {
                    param.name: {"default": param.default, "type": param.kind.__name__, "range": param.range_text()}
                    for param in strategy.parameters
                },
                "needs": sorted(strategy.needs),
                "composes": sorted(strategy.composes),
            }
        )
    return rows


def print_list(registry: Registry, as_json: bool, strategies: bool) -> None:
    """What ``fedplug list`` prints: the backends' and the strategies' tables, or JSON (``list_json``)."""
    if as_json:
        print(list_json(registry, strategies))
        return
    if not strategies:
        console.print(backends_table(backends_rows(registry)))
    console.print(strategies_table(strategies_rows(registry)))


def list_json(registry: Registry, strategies: bool) -> str:
    """``fedplug list --json``: backends and broken plugins; with ``--strategies``: strategies and broken plugins."""
    if not strategies:
        return json.dumps(backends_rows(registry), indent=2)
    broken = [row for row in backends_rows(registry) if row["status"] == "broken"]
    return json.dumps(strategies_rows(registry) + broken, indent=2)


def strategies_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="fedplug strategies")
    for column in ("strategy", "distribution", "parameters", "composes with", "description"):
        table.add_column(column)
    for row in rows:
        params = ", ".join(f"{key}={json.dumps(p['default'])}" for key, p in row["parameters"].items())
        table.add_row(
            row["name"],
            f"{row['distribution']} {row['version']}",
            params or "-",
            ", ".join(row["composes"]) or "-",
            row["description"] + (f" (needs {', '.join(row['needs'])})" if row["needs"] else ""),
        )
    return table


def show_strategy(strategy: Strategy, origin: str) -> None:
    """What ``fedplug info NAME`` prints for a strategy: where it comes from, its parameters and their ranges."""
    from fedplug.strategy_contract import CAPABILITIES, COMPOSES

    console.print(f"[bold]{strategy.name}[/] (strategy): {strategy.description}", highlight=False, soft_wrap=True)
    console.print(f"from: {origin}   implementation: {strategy.implementation}", highlight=False, soft_wrap=True)
    needs = [f"{need} ({CAPABILITIES[need]})" for need in sorted(strategy.needs)]
    console.print(f"needs from nodes: {'; '.join(needs) or 'nothing beyond training'}", highlight=False, soft_wrap=True)
    composes = ", ".join(f"{what} {'yes' if what in strategy.composes else 'no'}" for what in COMPOSES)
    console.print(f"composes with: {composes}", highlight=False)
    console.print(f"checkpoint state: {', '.join(strategy.state or ()) or 'none (stateless)'}", highlight=False)
    table = Table(title="parameters (--run-config strategy.<name>=value)")
    for column in ("name", "type", "default", "valid", "what it is"):
        table.add_column(column)
    for param in strategy.all_parameters().values():
        valid = param.range_text() + (" and at most the node count" if param.counts_nodes else "")
        table.add_row(param.name, param.kind.__name__, json.dumps(param.default), valid or "any", param.help)
    console.print(table)


def show_info(backend: Backend) -> None:
    """What ``fedplug info NAME`` prints: the backend's framework, models, tier, custom models and default config."""
    from fedplug.config import defaults_for

    if backend.notice:
        console.print(f"[yellow]{backend.notice}[/]")
    console.print(f"[bold]{backend.name}[/]: {description_text(backend)}")
    console.print(f"framework: {backend.framework.import_name} ({backend.framework.requirement})")
    problem = availability(backend)
    console.print(f"available: {'yes' if problem is None else f'no: {problem}'}", highlight=False, soft_wrap=True)
    tier = tier_text(backend)
    console.print(
        f"conformance: {tier}" + (f" ({TIERS[tier]})" if tier in TIERS else ""), highlight=False, soft_wrap=True
    )
    console.print(f"models: {', '.join(backend.models)}   native file: model{backend.file_suffix}")
    console.print(f"quickstart dataset: {backend.quickstart_dataset or '-'} (use with --dataset)")
    if backend.custom_models:
        console.print(
            "custom models: --model my_nets:Factory (or ./my_nets.py:Factory); Factory(spec, config) receives "
            "spec.input_shape (C, H, W), spec.num_classes and the run config, and must return "
            f"{backend.custom_models}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print("custom models: not supported by this backend")
    presets = dict(backend.presets)
    table = Table(
        title="default run config" + (" and presets (--preset NAME: its values over the defaults)" * bool(presets))
    )
    table.add_column("key")
    table.add_column("default")
    for name in presets:
        table.add_column(f"--preset {name}")
    for key, value in defaults_for(backend).items():
        table.add_row(key, json.dumps(value), *(json.dumps(p[key]) if key in p else "" for p in presets.values()))
    console.print(table)


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def round_line(record: dict[str, Any]) -> str:
    """``round 2 │ nodes 4 │ train 0.582 85.0% │ eval 0.467 88.3% │ server 0.435 88.9% │ 6.7 s``.

    A personalised strategy (``fedplug.personal``) adds its nodes' personal models after ``eval``:
    ``personal 0.201 93.5%``."""
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
    for kind, label in (("train", "train"), ("evaluate", "eval"), ("personal", "personal"), ("centralized", "server")):
        if f"{kind}-loss" in record:
            accuracy = record.get(f"{kind}-accuracy")
            parts.append(
                f"{label} {record[f'{kind}-loss']:.3f}" + (f" {accuracy:6.1%}" if accuracy is not None else "")
            )
    if "epsilon" in record:  # differential privacy: the budget spent so far (fedplug.dp)
        parts.append(f"ε {record['epsilon']:.3g} δ {record['delta']:g}")
    parts.append(f"{record['seconds']:.1f} s")
    line = " │ ".join(parts)
    return f"{line}\n{record['privacy-stop']}" if "privacy-stop" in record else line


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
    "personal-accuracy": "pers acc",  # a personalised strategy's personal models (fedplug.personal), 80 columns wide
    "centralized-loss": "server loss",
    "centralized-accuracy": "server acc",
    "epsilon": "epsilon",  # differential privacy (fedplug.dp), at the delta in the caption
    "seconds": "s",
}


def summary_table(rounds: list[dict[str, Any]]) -> Table:
    table = Table(title="summary", caption=privacy_caption(rounds))
    columns = [c for c in SUMMARY_COLUMNS if any(c in r for r in rounds)]
    for column in columns:
        table.add_column(SUMMARY_COLUMNS[column], justify="right")
    for record in rounds:
        table.add_row(*(_fmt(record.get(c), 2 if c == "seconds" else 4) for c in columns))
    return table


def privacy_caption(rounds: list[dict[str, Any]]) -> str | None:
    """Differential privacy under the summary: the epsilon spent at delta, and why the run stopped early."""
    spent = [record for record in rounds if "epsilon" in record]
    if not spent:
        return None
    last = spent[-1]
    text = f"differential privacy: epsilon {last['epsilon']:.3f} at delta {last['delta']:g} after round {last['round']}"
    return f"{text}; {last['privacy-stop']}" if "privacy-stop" in last else text


NODE_IDS = 2**20
"""Partition ids from here on are a deployed node's own id standing for one (data of its own): not worth showing."""


def backends_line(rounds: list[dict[str, Any]]) -> str:
    """``backends: torch 0-1 · jax 2-3 · numpy 4-5`` for a run whose nodes ran several backends, else ``""``.

    Nodes with their own data (a deployment's ``--data FILE``) have no partition ids to show: their
    backends are counted instead, ``backends: torch 2 nodes · jax 1 node``.
    """
    from fedplug.node_backends import compact, counts

    ran: dict[int, str] = {}
    for record in rounds:
        ran.update({int(partition): name for partition, name in record.get("partition-backends", {}).items()})
    if len(set(ran.values())) < 2:
        return ""
    if max(ran) >= NODE_IDS:
        tally = counts(ran[partition] for partition in sorted(ran))
        return "backends: " + " · ".join(f"{name} {n} node{'s' * (n != 1)}" for name, n in tally.items())
    parts: dict[str, list[str]] = {}
    for entry in compact(ran).split(","):
        partitions, name = entry.split(":")
        parts.setdefault(name, []).append(partitions)
    return "backends: " + " · ".join(f"{name} {','.join(ids)}" for name, ids in parts.items())
