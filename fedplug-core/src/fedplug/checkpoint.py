"""Checkpoints: what a run needs to continue exactly where it stopped, written atomically.

After every finished round the server writes ``checkpoints/round-NNNN/`` in the results
folder: ``weights.npz`` (the global model, canonical), ``strategy.npz`` (the strategy's
state, exactly the attributes its descriptor declares (``Strategy.state``): FedAdam's
moments, FedAvgM's momentum, ...; numbers as 0-d arrays) and ``state.json`` (round, the
metrics of every round so far, the strategy state's layout). A strategy that declares no
state is refused, never saved in part. The folder is written
under a temporary name and renamed, so a kill at any instant leaves either the previous
complete checkpoint or the new one. Older checkpoints are removed once the new one is in
place. Nothing is pickled.

Nodes keep nothing between rounds unless the strategy needs the ``node-state`` capability
(``fedplug.capabilities``): then each node's state, reported with its train reply, is saved in
``nodes.npz`` and sent back to the node when the run resumes. The example order and node
sampling depend only on the seed, the round and the partition ids.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedplug.backend import Weights
from fedplug.records import to_record
from fedplug.results import save_npz, strict_json
from fedplug.strategies import state_names

FOLDER = "checkpoints"
NAME = re.compile(r"round-(\d+)")
"""A complete checkpoint's folder: ``round-NNNN`` (four digits or more)."""


@dataclass
class Checkpoint:
    round: int
    weights: Weights
    strategy: dict[str, Any]
    rounds: list[dict[str, Any]]
    extra: dict[str, Any]
    node_states: dict[int, Weights] = field(default_factory=dict)
    """The nodes' states by partition (a strategy's ``node-state`` capability), from ``nodes.npz``."""


def _encode(where: str, value: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
    """One state attribute: its JSON spec and its arrays (numpy and Python scalars as 0-d arrays)."""
    if value is None:
        return {"kind": "none", "keys": []}, []
    if isinstance(value, bool | int | float) and not isinstance(value, np.generic):
        return {"kind": "python", "keys": [""]}, [np.asarray(value)]
    if isinstance(value, np.ndarray | np.generic):
        return {"kind": "array", "keys": [""], "scalars": [isinstance(value, np.generic)]}, [np.asarray(value)]
    if isinstance(value, ArrayRecord):
        items, kind = [(k, v.numpy()) for k, v in value.items()], "arrayrecord"
    elif isinstance(value, dict):
        items, kind = list(value.items()), "dict"
    elif isinstance(value, list):
        items, kind = [(str(i), v) for i, v in enumerate(value)], "list"
    else:
        raise TypeError(f"{where} is a {type(value).__name__}: fedplug checkpoints arrays and numbers only")
    for key, item in items:
        if not isinstance(key, str) or not isinstance(item, np.ndarray | np.generic):
            raise TypeError(f"{where}[{key!r}] is a {type(item).__name__}: fedplug checkpoints arrays and numbers only")
    spec = {"kind": kind, "keys": [key for key, _ in items], "scalars": [isinstance(v, np.generic) for _, v in items]}
    return spec, [np.asarray(v) for _, v in items]


def _decode(spec: dict[str, Any], arrays: list[np.ndarray]) -> Any:
    kind = spec["kind"]
    if kind == "python":
        return arrays[0].item()
    # numpy scalars (a 0-d weight's moment is one) come back as numpy scalars of their dtype
    values = [a[()] if scalar else a for a, scalar in zip(arrays, spec.get("scalars", [False] * len(arrays)))]
    if kind == "none":
        return None
    if kind == "arrayrecord":
        return to_record(dict(zip(spec["keys"], arrays)))
    if kind == "dict":
        return dict(zip(spec["keys"], values))
    if kind == "list":
        return values
    if kind == "array":
        return values[0]
    raise ValueError(f"unknown kind of strategy state in the checkpoint: {kind!r}")


def _state_layout(strategy: object) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The strategy's declared state (``Strategy.state``): a JSON layout and the arrays by flat key."""
    layout: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for attr in state_names(strategy):
        spec, values = _encode(f"{type(strategy).__name__}.{attr}", getattr(strategy, attr))
        layout[attr] = spec
        arrays.update({f"{attr}/{i}": array for i, array in enumerate(values)})
    return layout, arrays


def restore_strategy(strategy: object, layout: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Set the state saved by ``save`` back on a freshly built strategy, by name."""
    declared = state_names(strategy)
    unknown = sorted(set(layout) - set(declared))
    if unknown:
        raise ValueError(
            f"the checkpoint holds state {', '.join(unknown)} that {type(strategy).__name__} does not declare: "
            "it was written for another strategy"
        )
    for attr, spec in layout.items():
        setattr(strategy, attr, _decode(spec, [arrays[f"{attr}/{i}"] for i in range(len(spec["keys"]))]))


def save(
    out: Path,
    round_: int,
    weights: Weights,
    strategy: object,
    rounds: list[dict[str, Any]],
    node_states: dict[int, Weights] | None = None,
    **extra: Any,
) -> Path:
    """Write the checkpoint of ``round_`` atomically; keep only the newest one.

    ``node_states`` (the ``node-state`` capability) go to ``nodes.npz``, as ``PARTITION/NAME`` arrays.
    """
    layout, arrays = _state_layout(strategy)  # first: a strategy whose state cannot be saved leaves nothing
    root = out / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round_:04d}"
    tmp = root / f".round-{round_:04d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_npz(tmp / "weights.npz", weights)
    save_npz(tmp / "strategy.npz", arrays)
    flat = {f"{p}/{name}": a for p, state in sorted((node_states or {}).items()) for name, a in state.items()}
    save_npz(tmp / "nodes.npz", flat)
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
    found = [(NAME.fullmatch(path.name), path) for path in root.iterdir()] if root.is_dir() else []
    done = sorted((int(match[1]), path) for match, path in found if match)  # by number: round-10000 > round-9999
    for _, folder in reversed(done):
        try:
            state = json.loads((folder / "state.json").read_text())
            with np.load(folder / "weights.npz", allow_pickle=False) as saved:
                weights = {key: saved[key] for key in saved.files}
            with np.load(folder / "strategy.npz", allow_pickle=False) as saved:
                arrays = {key: saved[key] for key in saved.files}
            nodes: dict[int, Weights] = {}
            if (folder / "nodes.npz").is_file():  # checkpoints of fedplug 0.2.0 have none
                with np.load(folder / "nodes.npz", allow_pickle=False) as saved:
                    for key in saved.files:
                        partition, _, name = key.partition("/")
                        nodes.setdefault(int(partition), {})[name] = saved[key]
        except (OSError, ValueError, KeyError):
            continue
        strategy = {"layout": state["strategy"], "arrays": arrays}
        return Checkpoint(state["round"], weights, strategy, state["rounds"], state["extra"], nodes)
    return None
