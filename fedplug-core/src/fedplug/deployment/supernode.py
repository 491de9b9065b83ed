"""The checks of ``fedplug supernode`` before it joins a SuperLink: the backend, the address, the keys, the data."""

from __future__ import annotations

from pathlib import Path

from fedplug.availability import check_backend_available, find_backend
from fedplug.backend import Scalar
from fedplug.data import EMBEDDED, DataError
from fedplug.deployment.certificates import check_private_key
from fedplug.deployment.flower_cli import Security
from fedplug.deployment.network import split_address
from fedplug.errors import ConfigError, DeployError
from fedplug.node import describe_node


def check_supernode(
    backend: str,
    superlink: str,
    data: str,
    ca_cert: Path | None,
    key: Path | None,
    insecure: bool,
    partition_id: int | None,
    num_partitions: int | None,
    image_column: str,
    label_column: str,
) -> tuple[dict[str, Scalar], Security, str]:
    """This node's node config, how it reaches the SuperLink, and a one-line description of its data.

    Raises a one-line :class:`~fedplug.errors.FedplugError` for anything that would keep the node from
    training: an unknown or unavailable backend, a malformed address, a missing CA certificate or key,
    data that does not exist or does not load.
    """
    chosen = find_backend(backend)
    check_backend_available(chosen)
    node_config: dict[str, Scalar] = {"backend": chosen.name}
    if data == EMBEDDED:
        if partition_id is None or num_partitions is None or not 0 <= partition_id < num_partitions:
            raise ConfigError("--data embedded needs --partition-id I --num-partitions N with 0 <= I < N")
        node_config.update({"data": EMBEDDED, "partition-id": partition_id, "num-partitions": num_partitions})
    else:
        if not Path(data).expanduser().exists():
            raise ConfigError(f"data {data} does not exist: give this node's .parquet/.csv file or dataset folder")
        node_config["data"] = str(Path(data).expanduser().resolve())
    node_config.update({k: v for k, v in (("image-column", image_column), ("label-column", label_column)) if v})
    split_address(superlink)
    security = Security.of(ca_cert, insecure)
    if not insecure:
        if key is None:
            raise DeployError("pass --key supernode-I.key (this node's private key), or --insecure")
        try:
            check_private_key(key)
        except ValueError as error:
            raise DeployError(str(error)) from error
    try:
        described = describe_node(chosen.name, node_config)
    except (DataError, ValueError) as error:
        raise ConfigError(str(error)) from error
    return node_config, security, described
