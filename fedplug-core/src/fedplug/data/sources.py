"""Datasets as numpy arrays: the embedded digits, local parquet/csv files, hub ids and hub-style folders.

Every source becomes a :class:`Source`: raw images ``(N, C, H, W)`` (uint8 when the pixels are
whole numbers in 0..255, float32 otherwise), int64 labels, and the order in which the
partitioner sees the training examples (the seed's shuffle). Only hub ids and hub-style folders
go through flwr-datasets' ``FederatedDataset``; the embedded ``mnist.npz`` is read with numpy and
local files with pyarrow. Every check a user's data must pass (a local-looking name is a file
that exists in a format fedplug reads, the image and label columns differ, labels are whole
numbers from 0 making at most ``MAX_CLASSES`` classes, pixels are finite numbers, the dataset is
not empty) is made here, with one-line errors of at most ``MESSAGE_LIMIT`` characters.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import numpy as np

from fedplug.backend import DataSpec
from fedplug.errors import one_line

EMBEDDED = "embedded"
IMAGE_COLUMNS = ("image", "img", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "digit")
LOCAL_SUFFIXES = (".parquet", ".csv", ".csv.gz")
"""Suffixes of the local data files fedplug reads (with pyarrow; ``.csv.gz`` decompressed on the fly)."""
DATA_SUFFIXES = (
    *LOCAL_SUFFIXES,
    ".csv.bz2",
    ".csv.zip",
    ".tsv",
    ".txt",
    ".json",
    ".jsonl",
    ".arrow",
    ".feather",
    ".npz",
    ".npy",
    ".pkl",
    ".pickle",
    ".h5",
    ".hdf5",
    ".zip",
    ".tar",
    ".tar.gz",
    ".tgz",
    ".gz",
)
"""Suffixes that make a ``--dataset`` a local file, never a Hugging Face hub id."""
EMBEDDED_SPEC = DataSpec((1, 28, 28), 10)
MAX_CLASSES = 10_000
"""The most classes a dataset's labels may make (largest label + 1), unless its metadata declares more.

A label far out of line (a typo, an id column taken for labels) would otherwise build a model
with that many outputs and fail, out of memory, after the run started."""


class DataError(RuntimeError):
    """A dataset cannot be loaded or partitioned; the message (one line, capped) says what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


@dataclass(frozen=True)
class Source:
    """A dataset in numpy: what every node's partition is cut from."""

    x_train: np.ndarray
    """Raw training images ``(N, C, H, W)``, uint8 or float32, in the dataset's own order."""
    y_train: np.ndarray
    """int64 labels of ``x_train``."""
    x_test: np.ndarray | None
    """The held-out split for the server, or None when the dataset has none."""
    y_test: np.ndarray | None
    spec: DataSpec
    scale: bool
    """Whether pixels are divided by 255 (their maximum is above 1)."""
    order: np.ndarray | None
    """Positions of ``x_train`` in the order the partitioner sees them (the seed's shuffle); None: as stored."""

    def images(self, x: np.ndarray) -> np.ndarray:
        """Raw images -> float32 in [0, 1], exactly as the data layer always converted them."""
        images = np.array(x, dtype=np.float32)  # a fresh array, even from float32 or a memory map
        if self.scale:
            images /= 255.0  # in place: the same float32 values as images / 255.0, one pass less
        return images


def embedded_labels() -> np.ndarray:
    """The embedded training labels alone (the CLI's checks need no images)."""
    with resources.files(__package__).joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        return np.asarray(npz["train_labels"], dtype=np.int64)


def embedded_test() -> tuple[np.ndarray, np.ndarray]:
    """The 3,000 held-out embedded digits alone (raw uint8 ``(N, 1, 28, 28)``, int64 labels), for the server."""
    with resources.files(__package__).joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        return npz["test_images"][:, None], npz["test_labels"].astype(np.int64)


def embedded(seed: int) -> Source:
    """The 15,000 embedded MNIST digits: 12,000 to partition, 3,000 held out."""
    with resources.files(__package__).joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        arrays = {key: npz[key] for key in npz.files}
    order = np.random.default_rng(seed).permutation(len(arrays["train_labels"]))  # iid shards are contiguous
    return Source(
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
        EMBEDDED_SPEC,
        True,
        order,
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def load(name: str, seed: int, image_column: str, label_column: str) -> Source:
    """The dataset ``name``: ``embedded``, a local .parquet/.csv/.csv.gz file, a hub-style folder or a hub id."""
    if name == EMBEDDED:
        check_embedded_columns(image_column, label_column)
        return embedded(seed)
    if problem := dataset_problem(name):
        raise DataError(problem)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_hub(name, path, seed, image_column, label_column)
    if path.is_file():
        if not _suffix_in(path, LOCAL_SUFFIXES):
            kind = f"the {_suffix(path)} format" if _suffix(path) else "a file without a .parquet or .csv suffix"
            raise DataError(
                f"dataset file {_shown(name)}: {kind} is not supported; convert it to .parquet or .csv "
                "(an image column or pixel columns, and a label column)"
            )
        table, class_names = _read_file(path)
        order = np.random.default_rng(seed).permutation(table.num_rows)  # as FederatedDataset(shuffle=True) did
        return _from_tables(name, table, None, class_names, image_column, label_column, order)
    if looks_local(name):
        raise DataError(f"dataset file {_shown(name)} does not exist; {_missing_hint(path)}")
    if "/" not in name and difflib.get_close_matches(name.lower(), [EMBEDDED], cutoff=0.85):
        raise DataError(f"unknown dataset '{_shown(name, 60)}': did you mean --dataset embedded?")
    return _from_hub(name, path, seed, image_column, label_column)


def dataset_problem(name: str) -> str | None:
    """Why ``--dataset NAME`` names no dataset at all, or None; the CLI checks the text as typed.

    An empty name (a shell variable that was not set) would otherwise read as the current folder.
    """
    if not name.strip():
        return "--dataset is empty: give embedded, a .parquet or .csv file, a dataset folder or a Hugging Face id"
    return None


def looks_local(name: str) -> bool:
    """Whether ``--dataset name`` means a local file or folder rather than a hub id ``org/name``.

    It does when it starts with ``.``, ``/`` or ``~``, has more than one ``/`` (or any other path
    separator of this system), or ends in a data file suffix (:data:`DATA_SUFFIXES`); a URL such as
    ``hf://datasets/org/name`` does not.
    """
    if "://" in name:
        return False
    separators = {os.sep, os.altsep} - {None, "/"}
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or any(sep in name for sep in separators if sep)
        or _suffix_in(Path(name), DATA_SUFFIXES)
    )


def _missing_hint(path: Path) -> str:
    """What to do about a local dataset path that does not exist: the near name in its folder, if one is."""
    with suppress(OSError):
        names = {entry.name.lower(): entry.name for entry in path.parent.iterdir()} if path.parent.is_dir() else {}
        close = difflib.get_close_matches(path.name.lower(), list(names), n=1, cutoff=0.8)
        if close:
            return f"did you mean {_shown(str(path.parent / names[close[0]]))}?"
    return "give an existing .parquet or .csv file or dataset folder, or a Hugging Face id like ylecun/mnist"


def _suffix(path: Path) -> str:
    """``.csv.gz`` for ``data.csv.gz``: the last two suffixes when the last is a compression's."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in (".gz", ".bz2", ".zip"):
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def _suffix_in(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) and len(name) > len(suffix) for suffix in suffixes)


def _shown(name: str, limit: int = 120) -> str:
    """A user's path or name, printable and short enough for a one-line message."""
    return one_line(name, limit)


def check_embedded_columns(image_column: str, label_column: str) -> None:
    """Refuse ``image-column``/``label-column`` values that the embedded digits do not have (``image``, ``label``)."""
    for key, given, column in (("image-column", image_column, "image"), ("label-column", label_column, "label")):
        if given not in ("", column):
            raise DataError(
                f"dataset 'embedded': its {key[:-7]} column is '{column}', not {_shown(given, 60)!r}; "
                f"leave {key} out, or give a dataset file or hub id with --dataset"
            )


def _read_file(path: Path) -> tuple[Any, dict[str, int]]:
    """A local file as a pyarrow Table, and the class counts its Hugging Face metadata declares."""
    try:
        if _suffix(path) == ".parquet":
            table = _read_parquet(path)
        else:  # .csv, or .csv.gz that pyarrow decompresses by its suffix
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataError(
            f"cannot read dataset file {_shown(str(path))} ({_first_line(error)}); give a .parquet file or a "
            "text .csv file with a header row"
        ) from error
    return table, _declared_classes(table.schema.metadata or {})


READ_BATCH_ROWS = 16_384
"""Rows :func:`_read_parquet` decodes at a time."""


def _read_parquet(path: Path) -> Any:
    """A parquet file as a pyarrow Table, decoded :data:`READ_BATCH_ROWS` rows at a time.

    ``pq.read_table`` decodes a row group's column whole, and a nested image column (lists of lists of pixels)
    costs about ten times its pixels while decoding: 2.6 GB of resident memory, kept as the process's high-water
    mark, for the 300,000 digits (224 MB of pixels) of the 100,000-client benchmark. In batches the same table
    peaks at about 0.5 GB; its columns are the same (chunked per batch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        return pa.Table.from_batches(list(file.iter_batches(batch_size=READ_BATCH_ROWS)), schema=file.schema_arrow)


def _declared_classes(metadata: dict[bytes, bytes]) -> dict[str, int]:
    """``{column: num_classes}`` of ClassLabel columns in a parquet file written by ``datasets``."""
    with suppress(KeyError, ValueError, TypeError, AttributeError):
        features = json.loads(metadata[b"huggingface"])["info"]["features"]
        return {k: len(v["names"]) for k, v in features.items() if v.get("_type") == "ClassLabel"}
    return {}


def _from_hub(name: str, path: Path, seed: int, image_column: str, label_column: str) -> Source:
    """A hub id or hub-style folder through ``FederatedDataset``, converted to numpy once."""
    # no network: use the local Hugging Face cache only, instead of retrying for a minute
    offline = not path.exists() and "HF_HUB_OFFLINE" not in os.environ and not hub_reachable()
    with _offline_while_loading(offline):
        import datasets
        from flwr_datasets import FederatedDataset

        from fedplug.privacy import no_flwr_datasets_source_id

        no_flwr_datasets_source_id()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        federated = FederatedDataset(
            dataset=str(path) if path.is_dir() else name, partitioners={"train": 1}, shuffle=True, seed=seed
        )
        try:
            train = federated.load_split("train")
        except Exception as error:
            if path.is_dir():
                raise DataError(
                    f"cannot load dataset folder {_shown(name)} ({_first_line(error)}); lay it out as a hub dataset "
                    "(e.g. data/train-*.parquet and data/test-*.parquet) or give one .parquet or .csv file"
                ) from error
            raise DataError(
                f"cannot load dataset '{_shown(name)}' ({_first_line(error)}); without network use the offline "
                "default (--dataset embedded) or a local file (--dataset path/to/data.parquet)"
            ) from error
    test = None
    with suppress(ValueError):  # no held-out split: centralized evaluation is skipped
        test = federated.load_split("test")
    classes = {k: f.num_classes for k, f in train.features.items() if getattr(f, "num_classes", None)}
    return _from_tables(
        name,
        train.with_format("arrow")[:],
        None if test is None else test.with_format("arrow")[:],
        classes,
        image_column,
        label_column,
        None,  # FederatedDataset shuffled already
    )


@contextmanager
def _offline_while_loading(offline: bool) -> Iterator[None]:
    """Hugging Face's documented offline mode (local cache only), for this load only.

    ``datasets`` and ``huggingface_hub`` read ``HF_HUB_OFFLINE`` when first imported, into their
    ``config``/``constants`` modules, which they consult on every call: the variable is set while they
    are imported here and their two flags while the dataset loads, then all three are restored. So the
    environment that the run's other processes inherit stays as the user set it, and a long-lived
    process (a notebook calling ``fedplug.run()``) is not left offline, nor waits a minute of retries.
    """
    if not offline:
        yield
        return
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    flags: list[tuple[Any, Any]] = []
    try:
        for module_name in ("huggingface_hub.constants", "datasets.config"):
            module: Any = sys.modules.get(module_name)
            if module is None:
                import importlib

                module = importlib.import_module(module_name)
            flags.append((module, module.HF_HUB_OFFLINE))
            module.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, value in flags:
            module.HF_HUB_OFFLINE = value
        del os.environ["HF_HUB_OFFLINE"]


def _from_tables(
    name: str,
    train: Any,
    test: Any | None,
    classes: dict[str, int],
    image_column: str,
    label_column: str,
    order: np.ndarray | None,
) -> Source:
    if train.num_rows == 0:
        raise DataError(f"dataset '{_shown(name)}' has no examples")
    columns = list(train.column_names)
    label = _pick(columns, label_column, LABEL_COLUMNS, "label-column", name)
    image = _pick(columns, image_column, IMAGE_COLUMNS, "image-column", name)
    if image == label:
        raise DataError(
            f"dataset '{_shown(name)}': image-column and label-column are both '{label}', so the model would learn "
            "its own labels; set them to two different columns"
        )
    x_train, y_train = table_images(train, image, label, name), table_labels(train, label, name)
    num_classes = classes.get(label) or _derived_classes(y_train, label, name)
    x_test = y_test = None
    if test is not None and test.num_rows:
        x_test, y_test = table_images(test, image, label, name), table_labels(test, label, name)
        num_classes = classes.get(label) or max(num_classes, _derived_classes(y_test, label, name))
    for y in (y_train, y_test):
        if y is not None and y.max() >= num_classes:
            raise DataError(
                f"dataset '{_shown(name)}': label {int(y.max())} is out of range for {num_classes} classes "
                f"(column '{label}'); labels must be 0..{num_classes - 1}"
            )
    top = max(float(x.max(initial=0)) for x in (x_train, x_test) if x is not None)
    spec = DataSpec(tuple(int(d) for d in x_train.shape[1:]), int(num_classes))  # type: ignore[arg-type]
    return Source(x_train, y_train, x_test, y_test, spec, top > 1.0, order)


def _derived_classes(labels: np.ndarray, column: str, name: str) -> int:
    """The number of classes that ``labels`` (whole numbers from 0) make: the largest + 1, at most MAX_CLASSES."""
    top = int(labels.max())
    if top >= MAX_CLASSES:
        raise DataError(
            f"dataset '{_shown(name)}': label column '{column}' holds the label {top}, which would make {top + 1} "
            f"classes (at most {MAX_CLASSES}); labels must be class ids 0..K-1: fix that value or choose the right "
            "column with label-column"
        )
    return top + 1


def _columns(columns: list[str], most: int = 8) -> str:
    """A table's column names for a message: the first ``most`` of them and how many there are."""
    shown = ", ".join(_shown(column, 40) for column in columns[:most])
    return shown if len(columns) <= most else f"{shown}, ... ({len(columns)} columns)"


def _pick(columns: list[str], given: str, candidates: tuple[str, ...], key: str, name: str) -> str:
    if given:
        if given not in columns:
            raise DataError(
                f"dataset '{_shown(name)}' has no column '{_shown(given, 60)}' (columns: {_columns(columns)}); "
                f'set --run-config "{key}=NAME" to one of them'
            )
        return given
    for column in candidates:
        if column in columns:
            return column
    if key == "image-column" and len(columns) > 2:
        return ""  # tabular: every column but the label holds one pixel
    raise DataError(
        f"cannot tell the {key[:-7]} column of '{_shown(name)}' (columns: {_columns(columns)}); "
        f'set --run-config "{key}=NAME"'
    )


def table_labels(table: Any, column: str, name: str = "dataset") -> np.ndarray:
    """The int64 labels of a pyarrow table's ``column``: whole numbers from 0, else a DataError."""
    import pyarrow as pa

    array = table.column(column)
    kind = array.type
    where = f"dataset '{_shown(name)}': label column '{column}'"
    if array.null_count:
        raise DataError(f"{where} has {array.null_count} missing values; every example needs a label")
    if pa.types.is_dictionary(kind):
        array, kind = array.cast(kind.value_type), kind.value_type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        sample = array[0].as_py()
        raise DataError(
            f"{where} holds {kind} values like {_shown(repr(sample), 40)}, not class ids; "
            "write labels as integers 0..K-1"
        )
    values = array.to_numpy()
    if values.dtype.kind == "f":
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            raise DataError(
                f"{where} holds non-integer values like {bad[0].item()!r}; labels must be whole class ids 0..K-1"
            )
    labels = values.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{where} holds negative labels like {int(labels.min())}; labels must be 0..K-1")
    return cast(np.ndarray, labels)


def table_images(table: Any, column: str, label: str, name: str = "dataset") -> np.ndarray:
    """Raw images of a pyarrow table as ``(N, C, H, W)`` (or ``(N, F)`` for flat vectors).

    ``column`` empty means a tabular dataset whose other columns are the pixels of a square
    grey image (as MNIST in CSV form).
    """
    import pyarrow as pa

    if column:
        images = _column_array(table.column(column), column, name)
    else:
        pixels = [c for c in table.column_names if c != label]
        for pixel in pixels:
            kind = table.column(pixel).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise DataError(
                    f"dataset '{_shown(name)}': pixel column '{pixel}' holds {kind} values, not numbers; "
                    "every column but the label must hold one pixel value"
                )
        images = np.stack([_numbers(table.column(p), p, name) for p in pixels], axis=1)
        side = round(np.sqrt(images.shape[1]))
        if side * side != images.shape[1]:
            raise DataError(f"dataset '{_shown(name)}': cannot read {images.shape[1]} pixel columns as a square image")
        images = images.reshape(-1, side, side)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4):
        images = images.transpose(0, 3, 1, 2)
    return _compact(images, name)


def _numbers(array: Any, column: str, name: str) -> np.ndarray:
    if array.null_count:
        raise DataError(
            f"dataset '{_shown(name)}': column '{column}' has {array.null_count} missing or NaN values; "
            "every pixel must be a number"
        )
    return cast(np.ndarray, array.to_numpy())


def _column_array(array: Any, column: str, name: str) -> np.ndarray:
    """One image column (encoded images, nested lists or fixed-size arrays) as one numpy array."""
    import pyarrow as pa

    array = array.combine_chunks() if hasattr(array, "combine_chunks") else array
    if isinstance(array.type, pa.ExtensionType):  # e.g. datasets.Array2D: nested lists underneath
        array = array.storage
    kind = array.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:  # datasets.Image()
        return np.stack([_decode(item, column, name) for item in array.field("bytes").to_pylist()])
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return np.stack([_decode(item, column, name) for item in array.to_pylist()])
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        raise DataError(
            f"dataset '{_shown(name)}': image column '{column}' holds text like {array[0].as_py()[:20]!r}, not pixels; "
            "store images as encoded image bytes or nested lists of numbers"
        )
    shape: list[int] = []
    values = array
    while (
        pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type)
    ):
        if values.null_count:
            raise DataError(f"dataset '{_shown(name)}': image column '{column}' has missing values")
        lengths = values.value_lengths().to_numpy(zero_copy_only=False) if len(values) else np.zeros(0)
        if lengths.size and (lengths != lengths[0]).any():
            raise DataError(
                f"dataset '{_shown(name)}': images of column '{column}' differ in size; resize them to one size"
            )
        shape.append(int(lengths[0]) if lengths.size else 0)
        values = values.flatten()
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        raise DataError(
            f"dataset '{_shown(name)}': image column '{column}' holds {values.type} values, not pixel numbers"
        )
    flat = _numbers(values, column, name)
    return flat.reshape(len(array), *shape)


def _decode(data: bytes | None, column: str, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise DataError(f"dataset '{_shown(name)}': image column '{column}' has missing images")
    try:
        return np.asarray(Image.open(io.BytesIO(data)))
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(
            f"dataset '{_shown(name)}': cannot decode an image of column '{column}' ({_first_line(error)})"
        ) from error


def _compact(images: np.ndarray, name: str) -> np.ndarray:
    """uint8 when every pixel is a whole number in 0..255 (exact), float32 otherwise; refuse NaN/inf."""
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind == "f":
        finite = np.isfinite(images)
        if not finite.all():
            bad = images[~finite][0]
            raise DataError(
                f"dataset '{_shown(name)}' holds non-finite pixel values ({bad}); every pixel must be a number"
            )
        return images.astype(np.float32)
    if images.dtype.kind in "iub" and images.size and images.min() >= 0 and images.max() <= 255:
        return images.astype(np.uint8)
    return images.astype(np.float32)


def _first_line(error: BaseException, limit: int = 120) -> str:
    """The first line of an error from a library, printable and at most ``limit`` characters."""
    text = str(error).strip()
    return one_line(text.splitlines()[0], limit) if text else type(error).__name__
