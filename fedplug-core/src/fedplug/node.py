"""The node-side runtime: what a ClientApp needs to serve one node, and nothing operator-side.

A node runs with the run config (from the server) and its node config (from the engine:
``partition-id``/``num-partitions`` in a simulation, ``data=...`` and maybe ``backend`` on
a SuperNode). From them it gets its backend, its completed run config and its data, once per
process: :func:`session` builds the model once and every later round reuses it.
Nothing here starts a process or touches the Deployment Engine's tooling.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fedplug.backend import Backend, Config, DataSpec, Scalar, require_available
from fedplug.config import resolve
from fedplug.data import EMBEDDED, DataError, Partition, data_spec, load_local, load_partition
from fedplug.node_backends import node_run_config, others
from fedplug.plugins import get_backend


def backend_and_config(run_config: Config) -> tuple[Backend, dict[str, Scalar]]:
    """The backend named by the run config and the config completed with its defaults."""
    backend = get_backend(str(run_config.get("backend", "numpy")))
    config = resolve(backend, run_config, others(run_config))
    require_available(backend, config)
    return backend, config


@cache
def _session(run_config: tuple[tuple[str, Scalar], ...]) -> tuple[Backend, dict[str, Scalar], Any]:
    backend, config = backend_and_config(dict(run_config))
    model = backend.build_model(str(config["model"]), data_spec(config), config)
    return backend, config, model


def session(run_config: Config, node_config: Config) -> tuple[Backend, dict[str, Scalar], Any]:
    """This node's backend, its run config and its model: built once per process and backend, reused every round.

    The node's backend is its node config's (``fedplug supernode``), else its partition's in
    ``node-backends``, else the run's; a simulation worker serving nodes of several backends
    keeps one session per backend.
    """
    return _session(tuple(sorted(node_run_config(run_config, node_config).items())))


def identity(node_config: Config, node_id: int) -> tuple[int, int]:
    """``(partition id, number of partitions)`` of this node.

    A deployed node with its own data (``fedplug supernode --data FILE``) has no partition
    id: its node id stands for one, and the number of partitions is unknown (0).
    """
    if "partition-id" not in node_config:
        return node_id % 2**31, 0
    return int(node_config["partition-id"]), int(node_config["num-partitions"])


def _local_data(config: Config, node_config: Config) -> tuple[Partition, str]:
    """This node's data and where it is: its own file (node config ``data``) or a partition (``partition-id``)."""
    data = str(node_config.get("data", ""))
    if data and data != EMBEDDED:
        return load_local(config, data), data
    partition_id, num_partitions = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if data == EMBEDDED:
        config = {**config, "dataset": EMBEDDED}
    return load_partition(config, partition_id, num_partitions), f"{data or config['dataset']} partition {partition_id}"


def check_fits(part: Partition, spec: DataSpec, where: str) -> None:
    """A deployed node's data against the run's data spec: its images' shape, its labels below the classes.

    Raises DataError, one line saying what differs and what to do.
    """
    shape = tuple(part.x_train.shape[1:])
    largest = int(max(part.y_train.max(initial=0), part.y_test.max(initial=0)))
    if shape != tuple(spec.input_shape) or largest >= spec.num_classes:
        raise DataError(
            f"this node's images are {shape} with labels up to {largest}, but the run's are "
            f"{tuple(spec.input_shape)} with {spec.num_classes} classes ({where}): give this node data of that "
            "shape and classes, or run with a --dataset like this node's"
        )


def node_data(config: Config, node_config: Config) -> Partition:
    """This node's data: its own file (node config ``data``) or a partition (``partition-id``).

    A deployed node (node config ``data``) checks that its data fits the run's data spec
    (:func:`fedplug.data.data_spec`: the spec that the coordinator ships in the run config, so
    that no node loads the coordinator's dataset); a simulated node's partition is cut from the
    run's own dataset and fits by construction.
    """
    part, where = _local_data(config, node_config)
    if node_config.get("data"):
        check_fits(part, data_spec(config), where)
    return part


def describe_node(backend_name: str, node_config: dict[str, Scalar]) -> str:
    """Load this node's data with the backend's defaults: a one-line description, or DataError.

    Whether the data fits a run's shape and classes is checked when a run queries the node
    (:func:`node_data`): the run config brings them.
    """
    config = resolve(get_backend(backend_name), {})
    part, _ = _local_data(node_run_config(config, node_config), node_config)  # the run's spec comes with a run
    classes = len(set(part.y_train.tolist()) | set(part.y_test.tolist()))
    return (
        f"{len(part.y_train)} training and {len(part.y_test)} test images {tuple(part.x_train.shape[1:])}, "
        f"{classes} classes present"
    )
