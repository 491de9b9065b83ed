"""Which examples each node gets: flwr-datasets partitioners run on the labels alone, once per run.

A :class:`Plan` holds, for ``num_partitions`` nodes, each node's training and test example
indices into a :class:`~fedplug.data.sources.Source`. It is computed once per run (by the CLI,
which checks it) and read by every other process of the run; a process without it computes
the same plan itself. The per-node train/test split is ``datasets.Dataset.train_test_split``'s
(a seeded permutation, ``ceil(test_fraction * n)`` test examples first), done in numpy.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedplug.backend import Config, Scalar
from fedplug.data.sources import DataError
from fedplug.errors import ConfigError, one_line

PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
PARTITIONER_DEFAULTS: dict[str, dict[str, Scalar]] = {
    "dirichlet": {"alpha": 0.5},
    "pathological": {"num-classes-per-partition": 2},
    "shard": {"num-shards-per-partition": 2},
}
"""Values for the partitioners' required parameters, overridable as ``partitioner.<name>``."""
_ROW = "_fedplug_row"


@dataclass(frozen=True)
class Plan:
    """Every node's example indices: node ``i`` trains on ``indices[b[i, 0]:b[i, 1]]`` and
    tests on ``indices[b[i, 1]:b[i, 2]]`` with ``b = bounds``."""

    indices: np.ndarray
    bounds: np.ndarray

    def node(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        start, split, end = (int(v) for v in self.bounds[partition_id])
        return self.indices[start:split], self.indices[split:end]

    def sizes(self) -> np.ndarray:
        """Examples (train + test) per node."""
        return np.asarray(self.bounds[:, 2] - self.bounds[:, 0])


def make_partitioner(config: Config, num_partitions: int) -> Any:
    """The flwr-datasets partitioner named by ``partitioner``, with ``partitioner.*`` params."""
    from flwr_datasets import partitioner as fp

    name = str(config["partitioner"])
    classes = {
        "iid": fp.IidPartitioner,
        "dirichlet": fp.DirichletPartitioner,
        "pathological": fp.PathologicalPartitioner,
        "shard": fp.ShardPartitioner,
    }
    if name not in classes:
        raise ConfigError(f"unknown partitioner '{name}'; choose one of: {', '.join(PARTITIONERS)}")
    params = dict(PARTITIONER_DEFAULTS.get(name, {}))
    params.update({k.removeprefix("partitioner."): v for k, v in config.items() if k.startswith("partitioner.")})
    cls = classes[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"num_partitions": num_partitions}
    if "partition_by" in accepted:
        kwargs["partition_by"] = "label"
    if "seed" in accepted:
        kwargs["seed"] = int(config["seed"])
    for key, value in params.items():
        arg = key.replace("-", "_")
        if arg not in accepted or arg in ("self", "num_partitions", "partition_by"):
            options = [
                p.replace("_", "-") for p in accepted if p not in ("self", "num_partitions", "partition_by", "seed")
            ]
            raise ConfigError(
                f"partitioner '{name}' has no parameter '{key}'; it takes: {', '.join(options) or 'none'}"
            )
        kwargs[arg] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(one_line(f"partitioner '{name}': {error}")) from error


def min_examples(test_fraction: float) -> int:
    """The fewest examples a node needs so that its train/test split leaves both sides non-empty."""
    n = 2
    while n - math.ceil(test_fraction * n) < 1:
        n += 1
    return n


def too_many_nodes(name: str, total: int, num_partitions: int, test_fraction: float) -> DataError:
    most = total // min_examples(test_fraction)
    return DataError(
        f"{num_partitions} nodes are too many for dataset '{name}' ({total} training examples): each node "
        f"needs at least {min_examples(test_fraction)} examples for its train/test split (test-fraction "
        f"{test_fraction}); use --nodes {most} or fewer"
    )


def node_positions(labels: np.ndarray, config: Config, num_partitions: int) -> list[np.ndarray]:
    """Each node's example positions in ``labels`` (the partitioner's view of the dataset)."""
    if config["partitioner"] == "iid" and not any(k.startswith("partitioner.") for k in config):
        # IidPartitioner.load_partition(i) is Dataset.shard(num_partitions, i, contiguous=True):
        # the same contiguous blocks, without importing datasets (tests/test_partitions_unchanged.py)
        div, mod = divmod(len(labels), num_partitions)
        starts = [div * i + min(i, mod) for i in range(num_partitions + 1)]
        return [np.arange(starts[i], starts[i + 1]) for i in range(num_partitions)]
    partitioner = make_partitioner(config, num_partitions)
    import datasets

    table = datasets.Dataset.from_dict({"label": labels, _ROW: np.arange(len(labels))})
    partitioner.dataset = table
    positions = []
    for partition_id in range(num_partitions):
        try:
            with warnings.catch_warnings():  # e.g. "Classes [4] will NOT be used": not for the terminal
                warnings.simplefilter("ignore")
                part = partitioner.load_partition(partition_id)
        except ValueError as error:
            text = one_line(str(error).strip().splitlines()[0], 150) if str(error).strip() else type(error).__name__
            raise DataError(
                f"partitioner '{config['partitioner']}' cannot make {num_partitions} partitions: {text}"
            ) from error
        positions.append(np.asarray(part.with_format("numpy")[_ROW], dtype=np.int64))
    return positions


def split(size: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``Dataset.train_test_split(test_size=test_fraction, seed=seed)`` of ``size`` rows: (train, test) rows."""
    permutation = np.random.default_rng(seed).permutation(size)
    n_test = math.ceil(test_fraction * size)
    return permutation[n_test:], permutation[:n_test]


def make_plan(name: str, labels: np.ndarray, order: np.ndarray | None, config: Config, num_partitions: int) -> Plan:
    """Partition ``labels`` (stored order; ``order`` is the seed's shuffle) for ``num_partitions`` nodes.

    Raises
    ------
    DataError
        When a node would get too few examples for its train/test split.
    """
    test_fraction, seed = float(config["test-fraction"]), int(config["seed"])
    needed = min_examples(test_fraction)
    if num_partitions * needed > len(labels):
        raise too_many_nodes(name, len(labels), num_partitions, test_fraction)
    seen = labels if order is None else labels[order]
    chunks, bounds = [], np.zeros((num_partitions, 3), dtype=np.int64)
    start = 0
    for node, positions in enumerate(node_positions(seen, config, num_partitions)):
        if len(positions) < needed:
            raise DataError(
                f"partitioner '{config['partitioner']}' gives node {node} of {num_partitions} only "
                f"{len(positions)} examples, too few for its train/test split (at least {needed} with test-fraction "
                f"{test_fraction}); use fewer nodes or other partitioner.* values"
            )
        train, test = split(len(positions), test_fraction, seed)
        rows = positions if order is None else order[positions]
        chunks += [rows[train], rows[test]]
        bounds[node] = start, start + len(train), start + len(positions)
        start += len(positions)
    indices = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return Plan(indices.astype(np.int64), bounds)
