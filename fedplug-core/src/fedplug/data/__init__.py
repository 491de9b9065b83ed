"""The data layer: load a dataset once, partition it once per run, hand out numpy arrays by index.

Sources, by the run-config key ``dataset`` (see :mod:`fedplug.data.sources`):

- ``embedded``: 15,000 real MNIST digits shipped inside fedplug-core (see README.md here);
- a local ``.parquet``, ``.csv`` or ``.csv.gz`` file (read with pyarrow); any other existing file,
  or a name that looks like a path (:func:`~fedplug.data.sources.looks_local`) but does not exist,
  is refused and never taken for a hub id;
- a hub-style dataset folder or any Hugging Face dataset id (``ylecun/mnist``, ``uoft-cs/cifar10``)
  through flwr-datasets' ``FederatedDataset``.

Partitioning (see :mod:`fedplug.data.partition`) runs the flwr-datasets partitioner on the
labels alone and gives each node its example indices. A run computes this once: the CLI checks
the data and the plan before anything starts (:func:`check_data`) and writes them into the run
folder (:func:`share_run_data`, removed when the run ends however it ends); the simulation
process and every Ray worker (all marked by ``FEDPLUG_RUN_DIR``) read them from there and cut
each node's arrays by index with numpy. A process without those files (the Deployment Engine,
a test) computes the same plan itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedplug.backend import Config, DataSpec, Scalar
from fedplug.data.partition import (
    Plan,
    make_partitioner,
    make_plan,
    min_examples,
    split,
)
from fedplug.data.sources import (
    EMBEDDED,
    EMBEDDED_SPEC,
    DataError,
    Source,
    check_embedded_columns,
    embedded_labels,
    embedded_test,
)
from fedplug.data.sources import load as load_source

__all__ = [
    "EMBEDDED",
    "SPEC_KEYS",
    "DataError",
    "Partition",
    "check_data",
    "data_spec",
    "held_out",
    "load_centralized",
    "load_local",
    "load_partition",
    "make_partitioner",
    "min_examples",
    "partition_sizes",
    "remove_run_data",
    "share_run_data",
    "shipped_spec",
    "spec_config",
]

SHARED = ".fedplug-data"
"""Folder of a run's shared data inside its results folder, removed when the run ends."""
_KEYS = ("dataset", "seed", "image-column", "label-column", "test-fraction", "partitioner")


@dataclass(frozen=True)
class Partition:
    """One node's data, split train/test by ``test-fraction`` (default 0.2): float32 ``(N, C, H, W)``, int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


Key = tuple[tuple[str, Scalar], ...]


def _key(config: Config) -> Key:
    """The part of the run config that decides the data, hashable for caching."""
    return tuple(sorted((k, v) for k, v in config.items() if k in _KEYS or k.startswith("partitioner.")))


def _source_key(key: Key) -> Key:
    return tuple((k, v) for k, v in key if k in ("dataset", "seed", "image-column", "label-column"))


def _digest(key: Key) -> str:
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def load_partition(config: Config, partition_id: int, num_partitions: int) -> Partition:
    """Node ``partition_id``'s data of ``num_partitions``, cut by index from the run's shared source."""
    return _partition(_key(config), partition_id, num_partitions)


def partition_sizes(config: Config, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and test examples of every one of ``num_partitions`` partitions (two arrays), from the run's plan.

    What :func:`load_partition` would give each, without cutting any data: for a population of clients.
    """
    bounds = _plan(_key(config), num_partitions).bounds
    return bounds[:, 1] - bounds[:, 0], bounds[:, 2] - bounds[:, 1]


def load_centralized(config: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """The server-side held-out set (the dataset's ``test`` split), or None if it has none."""
    return _centralized(_key(config))


def held_out(config: Config) -> bool:
    """Whether the dataset has a held-out set for the server's centralized evaluation (its ``test`` split).

    The embedded digits have one; a local file has none; a hub dataset or folder has one when it has a
    ``test`` split. Without one, ``centralized-eval`` evaluates nothing (:func:`load_centralized` is None).
    """
    key = _key(config)
    if dict(key)["dataset"] == EMBEDDED:
        return True
    shared = _shared(key)
    return bool(shared.meta["test"]) if shared is not None else _source(_source_key(key)).x_test is not None


def data_spec(config: Config) -> DataSpec:
    """Input shape and number of classes of the run's data.

    A run on a SuperLink ships them in its run config (:data:`SPEC_KEYS`, set by the coordinator's
    plan): the ServerApp and every node read them there and never load the coordinator's dataset.
    Otherwise they are the configured dataset's.
    """
    shipped = shipped_spec(config)
    if shipped is not None:
        return shipped
    key = _key(config)
    if dict(key)["dataset"] == EMBEDDED:
        return EMBEDDED_SPEC
    shared = _shared(key)
    return shared.spec if shared is not None else _source(_source_key(key)).spec


SPEC_KEYS = ("data.input-shape", "data.num-classes")
"""Run-config keys of the data spec a run on a SuperLink ships to its nodes (``"1,28,28"`` and ``10``): set by
fedplug (:func:`spec_config`, in the coordinator's plan), never by the user; empty and 0 otherwise."""


def spec_config(spec: DataSpec) -> dict[str, Scalar]:
    """``spec`` as the run-config values of :data:`SPEC_KEYS`."""
    return {SPEC_KEYS[0]: ",".join(str(size) for size in spec.input_shape), SPEC_KEYS[1]: int(spec.num_classes)}


def shipped_spec(config: Config) -> DataSpec | None:
    """The data spec the run config ships (:data:`SPEC_KEYS`), or None when it ships none."""
    shape = str(config.get(SPEC_KEYS[0], "")).strip()
    if not shape:
        return None
    sizes = shape.split(",")
    classes = config.get(SPEC_KEYS[1], 0)
    if (
        len(sizes) != 3
        or not all(size.strip().isdigit() and int(size) > 0 for size in sizes)
        or not (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 1)
    ):
        raise DataError(
            f"run config ships a malformed data spec ({SPEC_KEYS[0]}={shape!r}, {SPEC_KEYS[1]}={classes!r}): "
            "submit the run again with fedplug run --superlink"
        )
    channels, height, width = (int(size) for size in sizes)
    return DataSpec((channels, height, width), classes)


def check_data(config: Config) -> DataSpec:
    """Everything about the data a run needs, checked before it starts; the data spec.

    Loads only what the checks need (the labels alone for the embedded digits), refuses bad
    data and node counts that leave a node too few examples, and computes the partition plan
    that :func:`share_run_data` then hands to the run's other processes.

    Raises
    ------
    DataError
        With a one-line message saying what to do.
    """
    key, nodes = _key(config), int(config["num-supernodes"])
    if dict(key)["dataset"] == EMBEDDED:  # its labels alone are loaded below: check the columns asked for
        check_embedded_columns(str(config["image-column"]), str(config["label-column"]))
    _plan(key, nodes)
    return data_spec(config)


def share_run_data(config: Config, out: str | os.PathLike[str], watched: bool = True) -> None:
    """Write the run's partition plan (and a non-embedded dataset as .npy arrays) into ``out``.

    The run's other processes read them instead of loading and partitioning the data again.
    The folder is a copy of the dataset: it must not outlive the run however the command ends.
    :func:`remove_run_data` removes it when the run ends; if the command is killed first
    (SIGKILL, the OOM killer), a small watcher process started here, before anything is written,
    removes it when this process is gone (:func:`_watch`). ``watched=False``: no watcher, the
    folder outlives this process until :func:`remove_run_data` (a benchmark's short-lived stage).
    """
    key, nodes = _key(config), int(config["num-supernodes"])
    folder = Path(out) / SHARED
    if watched:
        _watch(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"key": _digest(key)}
    if dict(key)["dataset"] != EMBEDDED:
        source = _source(_source_key(key))
        meta.update(spec=[list(source.spec.input_shape), source.spec.num_classes], scale=source.scale)
        arrays = {
            "x_train": source.x_train,
            "y_train": source.y_train,
            "x_test": source.x_test,
            "y_test": source.y_test,
        }
        for name, array in arrays.items():
            if array is not None:
                np.save(folder / f"{name}.npy", array)
        meta["test"] = source.x_test is not None
    plan = _plan(key, nodes)
    np.savez(folder / f"plan-{nodes}.npz", indices=plan.indices, bounds=plan.bounds)
    (folder / "meta.json").write_text(json.dumps(meta))


def remove_run_data(out: str | os.PathLike[str]) -> None:
    """Remove the shared data of a finished run from its results folder, and stop its watcher."""
    folder = Path(out) / SHARED
    shutil.rmtree(folder, ignore_errors=True)
    watcher = _WATCHERS.pop(str(folder.absolute()), None)
    if watcher is not None:
        watcher.terminate()
        watcher.wait()


_WATCHERS: dict[str, subprocess.Popen[bytes]] = {}
_WATCHER = r"""
import ctypes, os, shutil, signal, sys, time
folder, parent, main_thread = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

def clean(*_):
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)

signal.signal(signal.SIGTERM, clean)
signal.signal(signal.SIGHUP, clean)
if main_thread and sys.platform.startswith("linux"):  # the signal comes when the starting *thread* ends
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the parent's end is at once
sys.stdout.write("watching\n")
sys.stdout.flush()
while os.getppid() == parent:  # elsewhere, or started from another thread: notice it within a second
    time.sleep(1.0)
clean()
"""


def _watch(folder: Path) -> None:
    """Start a process that removes ``folder`` as soon as this process ends, however it ends.

    It runs in a session of its own (a kill of this command's process group does not reach it),
    learns of this process's end from the kernel (Linux's parent-death signal, when started from
    the main thread; else by polling its parent every second), and is stopped by
    :func:`remove_run_data`. Nothing is written before it is watching. It imports the standard
    library only: a few tens of milliseconds.
    """
    where = str(folder.absolute())
    if where in _WATCHERS and _WATCHERS[where].poll() is None:
        return
    on_main_thread = threading.current_thread() is threading.main_thread()
    watcher = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHER, where, str(os.getpid()), str(int(on_main_thread))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert watcher.stdout is not None
    watching = watcher.stdout.readline() == b"watching\n"
    watcher.stdout.close()
    if not watching:
        watcher.wait()
        raise DataError(f"cannot start the process that removes {where} after the run ({sys.executable} failed)")
    _WATCHERS[where] = watcher


def load_local(config: Config, path: str | os.PathLike[str]) -> Partition:
    """A whole local .parquet/.csv/.csv.gz file as ONE node's data, split by ``test-fraction`` with ``seed``.

    For a node of the Deployment Engine that holds its own data file; computed once per process.
    """
    return _local(_key(config), str(Path(path).expanduser().resolve()))


@lru_cache(maxsize=4)
def _local(key: Key, path: str) -> Partition:
    config = dict(key)
    source = _source((("dataset", path), *((k, v) for k, v in _source_key(key) if k != "dataset")))
    fraction = float(config["test-fraction"])
    if len(source.y_train) < min_examples(fraction):
        raise DataError(
            f"dataset file {path} has {len(source.y_train)} examples, too few for a train/test split "
            f"(at least {min_examples(fraction)} with test-fraction {fraction})"
        )
    rows = source.order if source.order is not None else np.arange(len(source.y_train))
    train, test = split(len(rows), fraction, int(config["seed"]))
    return _cut(source, rows[train], rows[test])


# --- per process: the shared files of the run, or the same computed here --------------------------


@dataclass(frozen=True)
class _Shared:
    folder: Path
    meta: dict[str, Any]

    @property
    def spec(self) -> DataSpec:
        shape, classes = self.meta["spec"]
        return DataSpec(tuple(shape), int(classes))


@cache
def _shared(key: Key) -> _Shared | None:
    """The run's shared data (``FEDPLUG_RUN_DIR``), when it was written for this data config."""
    run_dir = os.environ.get("FEDPLUG_RUN_DIR")
    if not run_dir:
        return None
    folder = Path(run_dir) / SHARED
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != _digest(key) or (dict(key)["dataset"] != EMBEDDED and "spec" not in meta):
        return None
    return _Shared(folder, meta)


@cache
def _source(source_key: Key) -> Source:
    config = dict(source_key)
    return load_source(
        str(config["dataset"]), int(config["seed"]), str(config["image-column"]), str(config["label-column"])
    )


@cache
def _arrays(key: Key) -> Source:
    """This process's source arrays: memory-mapped from the run folder, or loaded here."""
    shared = _shared(key)
    if shared is None or dict(key)["dataset"] == EMBEDDED:
        return _source(_source_key(key))
    folder, test = shared.folder, shared.meta["test"]

    def array(name: str) -> np.ndarray:
        return np.asarray(np.load(folder / f"{name}.npy", mmap_mode="r"))

    return Source(
        array("x_train"),
        array("y_train"),
        array("x_test") if test else None,
        array("y_test") if test else None,
        shared.spec,
        bool(shared.meta["scale"]),
        None,
    )


@cache
def _plan(key: Key, num_partitions: int) -> Plan:
    shared = _shared(key)
    if shared is not None and (shared.folder / f"plan-{num_partitions}.npz").is_file():
        with np.load(shared.folder / f"plan-{num_partitions}.npz") as npz:
            return Plan(npz["indices"], npz["bounds"])
    config = dict(key)
    name = str(config["dataset"])
    labels: np.ndarray
    order: np.ndarray | None
    if name == EMBEDDED:
        labels = embedded_labels()
        order = np.random.default_rng(int(config["seed"])).permutation(len(labels))
    else:
        source = _source(_source_key(key))
        labels, order = source.y_train, source.order
    return make_plan(name, labels, order, config, num_partitions)


def _cut(source: Source, train: np.ndarray, test: np.ndarray) -> Partition:
    return Partition(
        source.images(source.x_train[train]),
        np.asarray(source.y_train[train], dtype=np.int64),
        source.images(source.x_train[test]),
        np.asarray(source.y_train[test], dtype=np.int64),
    )


@lru_cache(maxsize=64)
def _partition(key: Key, partition_id: int, num_partitions: int) -> Partition:
    plan = _plan(key, num_partitions)
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is out of range for {num_partitions} partitions")
    train, test = plan.node(partition_id)
    return _cut(_arrays(key), train, test)


@cache
def _centralized(key: Key) -> tuple[np.ndarray, np.ndarray] | None:
    if dict(key)["dataset"] == EMBEDDED:  # the server needs the held-out digits only
        x, y = embedded_test()
        images = x.astype(np.float32)
        images /= 255.0
        return images, y
    source = _arrays(key)
    if source.x_test is None or source.y_test is None:
        return None
    return source.images(source.x_test), np.asarray(source.y_test, dtype=np.int64)
