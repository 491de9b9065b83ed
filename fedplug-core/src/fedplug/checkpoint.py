"""Checkpoints: what a run needs to continue exactly where it stopped, written atomically.

After every finished round the server writes ``checkpoints/round-NNNN/`` in the results
folder: ``weights.npz`` (the global model, canonical), ``strategy.npz`` (the strategy's
array state: FedAdam's moments, FedAvgM's momentum, ...) and ``state.json`` (round,
the metrics of every round so far, the strategy state's layout). The folder is written
under a temporary name and renamed, so a kill at any instant leaves either the previous
complete checkpoint or the new one. Older checkpoints are removed once the new one is in
place. Nothing is pickled.

Client state needs no checkpoint: nodes keep nothing between rounds, and the example
order and node sampling depend only on the seed, the round and the partition ids.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedplug.backend import Weights
from fedplug.records import to_record
from fedplug.results import save_npz, strict_json

FOLDER = "checkpoints"


@dataclass
class Checkpoint:
    round: int
    weights: Weights
    strategy: dict[str, Any]
    rounds: list[dict[str, Any]]
    extra: dict[str, Any]


def _state_layout(strategy: object) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The strategy's array-valued attributes: a JSON layout and the arrays by flat key."""
    layout: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for attr, value in vars(strategy).items():
        if isinstance(value, ArrayRecord):
            items, kind = [(k, v.numpy()) for k, v in value.items()], "arrayrecord"
        elif isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            items, kind = list(value.items()), "dict"
        elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            items, kind = [(str(i), v) for i, v in enumerate(value)], "list"
        elif isinstance(value, np.ndarray):
            items, kind = [("", value)], "array"
        else:
            continue
        layout[attr] = {"kind": kind, "keys": [key for key, _ in items]}
        arrays.update({f"{attr}/{i}": array for i, (_, array) in enumerate(items)})
    return layout, arrays


def restore_strategy(strategy: object, layout: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Set the array-valued attributes saved by ``save`` back on a freshly built strategy."""
    for attr, spec in layout.items():
        values = [arrays[f"{attr}/{i}"] for i in range(len(spec["keys"]))]
        kind = spec["kind"]
        if kind == "arrayrecord":
            value: Any = to_record(dict(zip(spec["keys"], values)))
        elif kind == "dict":
            value = dict(zip(spec["keys"], values))
        elif kind == "list":
            value = values
        else:
            value = values[0]
        setattr(strategy, attr, value)


def save(
    out: Path, round_: int, weights: Weights, strategy: object, rounds: list[dict[str, Any]], **extra: Any
) -> Path:
    """Write the checkpoint of ``round_`` atomically; keep only the newest one."""
    root = out / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round_:04d}"
    tmp = root / f".round-{round_:04d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    layout, arrays = _state_layout(strategy)
    save_npz(tmp / "weights.npz", weights)
    save_npz(tmp / "strategy.npz", arrays)
    state = {"round": round_, "strategy": layout, "rounds": rounds, "extra": extra}
    (tmp / "state.json").write_text(strict_json(state))
    for path in tmp.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    if final.exists():  # a run resumed from an older round writes it again
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out: Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``out``, or None."""
    root = out / FOLDER
    done = sorted(root.glob("round-[0-9][0-9][0-9][0-9]")) if root.is_dir() else []
    for folder in reversed(done):
        try:
            state = json.loads((folder / "state.json").read_text())
            with np.load(folder / "weights.npz", allow_pickle=False) as saved:
                weights = {key: saved[key] for key in saved.files}
            with np.load(folder / "strategy.npz", allow_pickle=False) as saved:
                arrays = {key: saved[key] for key in saved.files}
        except (OSError, ValueError, KeyError):
            continue
        return Checkpoint(
            state["round"], weights, {"layout": state["strategy"], "arrays": arrays}, state["rounds"], state["extra"]
        )
    return None
