"""The data layer: load a dataset, partition it with flwr-datasets, hand out numpy arrays.

Sources, by the run-config key ``dataset``:

- ``embedded``: 15,000 real MNIST digits shipped inside fedplug-core (see README.md here);
- a local ``.parquet`` or ``.csv`` file, or a folder of them;
- any Hugging Face dataset id (``ylecun/mnist``, ``uoft-cs/cifar10``) through
  flwr-datasets' ``FederatedDataset``.

Each process loads a dataset once and each partition once; later rounds reuse them.
"""

from __future__ import annotations

import inspect
import os
import socket
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from fedplug.backend import Config, DataSpec, Scalar
from fedplug.config import ConfigError

EMBEDDED = "embedded"
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
PARTITIONER_DEFAULTS: dict[str, dict[str, Scalar]] = {
    "dirichlet": {"alpha": 0.5},
    "pathological": {"num-classes-per-partition": 2},
    "shard": {"num-shards-per-partition": 2},
}
"""Values for the partitioners' required parameters, overridable as ``partitioner.<name>``."""
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "digit")
LOCAL_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


class DataError(RuntimeError):
    """A dataset cannot be loaded or partitioned; the message says what to do."""


@dataclass(frozen=True)
class Partition:
    """One node's data: an 80/20 (``test-fraction``) train/test split and the data spec."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    spec: DataSpec


def _key(config: Config) -> tuple[tuple[str, Scalar], ...]:
    """The part of the run config that decides the data, hashable for caching."""
    names = ("dataset", "partitioner", "seed", "image-column", "label-column", "test-fraction")
    return tuple(sorted((k, v) for k, v in config.items() if k in names or k.startswith("partitioner.")))


def load_partition(config: Config, partition_id: int, num_partitions: int) -> Partition:
    """Node ``partition_id``'s data, computed once per process."""
    return _partition(_key(config), partition_id, num_partitions)


def load_centralized(config: Config) -> tuple[np.ndarray, np.ndarray] | None:
    """The server-side held-out set (the dataset's ``test`` split), or None if it has none."""
    return _centralized(_key(config))


def data_spec(config: Config) -> DataSpec:
    """Input shape and number of classes of the configured dataset."""
    return _source(_key(config)).spec


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
        kwargs["seed"] = int(config["seed"])  # type: ignore[arg-type]
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
        raise ConfigError(f"partitioner '{name}': {error}") from error


@dataclass
class _Source:
    train: Any  # a datasets.Dataset with columns "image" and "label"
    test: Any | None
    spec: DataSpec
    image: str
    label: str


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@cache
def _source(key: tuple[tuple[str, Scalar], ...]) -> _Source:
    config = dict(key)
    name = str(config["dataset"])
    on_hub = name != EMBEDDED and not Path(name).expanduser().exists()
    if on_hub and "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        # no network: use the local Hugging Face cache only, instead of retrying for a minute
        os.environ["HF_HUB_OFFLINE"] = "1"
    _quiet_datasets()
    if name == EMBEDDED:
        return _embedded(int(config["seed"]))  # type: ignore[arg-type]
    splits = _load_splits(name, config)
    train = splits["train"]
    image = _pick(train, str(config["image-column"]), IMAGE_COLUMNS, "image-column", name)
    label = _pick(train, str(config["label-column"]), LABEL_COLUMNS, "label-column", name)
    first = to_images(train.select([0]), image)
    feature = train.features[label]
    num_classes = getattr(feature, "num_classes", None) or int(np.max(train[label])) + 1
    spec = DataSpec(tuple(first.shape[1:]), int(num_classes))  # type: ignore[arg-type]
    return _Source(train, splits.get("test"), spec, image, label)


def _embedded(seed: int) -> _Source:
    import datasets

    with resources.files(__name__).joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        arrays = {key: npz[key] for key in npz.files}
    features = datasets.Features(
        {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(num_classes=10)}
    )

    def build(split: str, order: np.ndarray | None = None) -> Any:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if order is not None:
            images, labels = images[order], labels[order]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    shuffled = np.random.default_rng(seed).permutation(len(arrays["train_labels"]))
    train = build("train", shuffled)  # iid partitions are contiguous blocks: shuffle first
    return _Source(train, build("test"), DataSpec((1, 28, 28), 10), "image", "label")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _load_splits(name: str, config: dict[str, Scalar]) -> dict[str, Any]:
    """Load every split of a local file/folder or a hub dataset with ``FederatedDataset``."""
    from flwr_datasets import FederatedDataset

    path = Path(name).expanduser()
    kwargs: dict[str, Any] = {}
    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"dataset file {path} does not exist")
        kwargs = {"dataset": LOCAL_SUFFIXES[path.suffix], "data_files": str(path)}
    else:
        kwargs = {"dataset": str(path) if path.is_dir() else name}
    federated = FederatedDataset(
        partitioners={"train": 1},
        shuffle=True,
        seed=int(config["seed"]),
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        splits = {"train": federated.load_split("train")}
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"cannot load dataset '{name}' ({reason}); without network use the offline "
            "default (--dataset embedded) or a local file (--dataset path/to/data.parquet)"
        ) from error
    with suppress(ValueError):  # no held-out split: centralized evaluation is skipped
        splits["test"] = federated.load_split("test")
    return splits


def _pick(dataset: Any, given: str, candidates: tuple[str, ...], key: str, name: str) -> str:
    columns = list(dataset.column_names)
    if given:
        if given not in columns:
            raise DataError(f"dataset '{name}' has no column '{given}' (columns: {', '.join(columns)})")
        return given
    for column in candidates:
        if column in columns:
            return column
    if key == "image-column" and len(columns) > 2:
        return ""  # tabular: every column but the label holds one pixel
    raise DataError(
        f"cannot tell the {key[:-7]} column of '{name}' (columns: {', '.join(columns)}); "
        f'set --run-config "{key}=NAME"'
    )


def to_images(dataset: Any, column: str, label: str = "label") -> np.ndarray:
    """Images of ``column`` as float32 ``(N, C, H, W)`` in ``[0, 1]``.

    ``column`` empty means a tabular dataset whose other columns are the pixels of a
    square grey image (as MNIST in CSV form).
    """
    if column:
        images = np.asarray(dataset.with_format("numpy")[column])
    else:
        pixels = dataset.remove_columns([label]).with_format("numpy")[:]
        images = np.stack([np.asarray(v) for v in pixels.values()], axis=1)
        side = round(np.sqrt(images.shape[1]))
        if side * side != images.shape[1]:
            raise DataError(f"cannot read {images.shape[1]} pixel columns as a square image")
        images = images.reshape(-1, side, side)
    if images.dtype == object:
        images = np.stack([np.asarray(image) for image in images])
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    images = images.astype(np.float32)
    return images / 255.0 if images.max(initial=0) > 1.0 else images


def _arrays(dataset: Any, source: _Source) -> tuple[np.ndarray, np.ndarray]:
    x = to_images(dataset, source.image, source.label)
    y = np.asarray(dataset.with_format("numpy")[source.label]).astype(np.int64)
    return x, y


@cache
def _partition(key: tuple[tuple[str, Scalar], ...], partition_id: int, num_partitions: int) -> Partition:
    config = dict(key)
    source = _source(key)
    partitioner = make_partitioner(config, num_partitions)
    partitioner.dataset = source.train
    try:
        part = partitioner.load_partition(partition_id)
    except ValueError as error:
        raise DataError(f"cannot make partition {partition_id} of {num_partitions}: {error}") from error
    split = part.train_test_split(test_size=float(config["test-fraction"]), seed=int(config["seed"]))  # type: ignore[arg-type]
    x_train, y_train = _arrays(split["train"], source)
    x_test, y_test = _arrays(split["test"], source)
    return Partition(x_train, y_train, x_test, y_test, source.spec)


@cache
def _centralized(key: tuple[tuple[str, Scalar], ...]) -> tuple[np.ndarray, np.ndarray] | None:
    source = _source(key)
    return None if source.test is None else _arrays(source.test, source)
