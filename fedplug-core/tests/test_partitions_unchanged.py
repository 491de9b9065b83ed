"""Every partitioner gives the same partitions as the implementation before issue 19, bit for bit.

The fingerprints below were computed with the previous data layer (a Hugging Face ``Dataset`` of
images cut by the flwr-datasets partitioner and ``Dataset.train_test_split``) by running this file
as a script (``python tests/test_partitions_unchanged.py``) before the data layer changed. Each
fingerprint is a SHA-256 over every node's ``x_train``, ``y_train``, ``x_test`` and ``y_test`` bytes
(float32 images, int64 labels) plus the per-node train/test sizes, so a changed example, order,
dtype or scaling fails the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fedplug.config import resolve
from fedplug.data import load_centralized, load_partition
from fedplug.numpy_backend import NumpyBackend

pytestmark = pytest.mark.fast

CASES: dict[str, tuple[dict, int]] = {
    "iid-10": ({}, 10),
    "iid-3-seed7": ({"seed": 7}, 3),
    "iid-7-test30": ({"test-fraction": 0.3, "seed": 5}, 7),
    "dirichlet-10": ({"partitioner": "dirichlet"}, 10),
    "dirichlet-5-alpha0.1-seed1": ({"partitioner": "dirichlet", "partitioner.alpha": 0.1, "seed": 1}, 5),
    "pathological-5": ({"partitioner": "pathological"}, 5),
    "pathological-7-3cls-seed3": (
        {"partitioner": "pathological", "partitioner.num-classes-per-partition": 3, "seed": 3},
        7,
    ),
    "shard-10": ({"partitioner": "shard"}, 10),
    "shard-4-3shards": ({"partitioner": "shard", "partitioner.num-shards-per-partition": 3}, 4),
    "csv-iid-3": ({"dataset": "{csv}"}, 3),
    "csv-dirichlet-2": ({"dataset": "{csv}", "partitioner": "dirichlet", "partitioner.alpha": 5.0}, 2),
    "parquet-iid-2-seed9": ({"dataset": "{parquet}", "seed": 9}, 2),
    "folder-iid-2": ({"dataset": "{folder}", "image-column": "pixels", "label-column": "digit_class"}, 2),
}

EXPECTED: dict[str, tuple[str, list[list[int]]]] = {
    "iid-10": (
        "02e417fcb5a6cb8b0eca8fcc",
        [
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
        ],
    ),
    "iid-3-seed7": ("b713c66573a0ba5956063b17", [[3200, 800], [3200, 800], [3200, 800]]),
    "iid-7-test30": (
        "b4b90c8c6c713ba9ef9abf31",
        [[1200, 515], [1200, 515], [1199, 515], [1199, 515], [1199, 515], [1199, 515], [1199, 515]],
    ),
    "dirichlet-10": (
        "e216260b4b291e2776b511d4",
        [
            [1481, 371],
            [1292, 323],
            [296, 75],
            [1457, 365],
            [1011, 253],
            [956, 240],
            [811, 203],
            [544, 136],
            [1329, 333],
            [419, 105],
        ],
    ),
    "dirichlet-5-alpha0.1-seed1": (
        "264d17cdd673577daced1252",
        [[362, 91], [2806, 702], [1604, 401], [3447, 862], [1380, 345]],
    ),
    "pathological-5": ("a169a44fbacc99237d913508", [[811, 203], [1920, 481], [784, 197], [1201, 301], [959, 240]]),
    "pathological-7-3cls-seed3": (
        "6a54362204e804d0e8ff17ea",
        [[1655, 414], [958, 240], [1474, 369], [1028, 258], [1287, 322], [1248, 312], [994, 249]],
    ),
    "shard-10": (
        "31e01ae55410cf11cb991194",
        [
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
            [960, 240],
        ],
    ),
    "shard-4-3shards": ("2785974f70405d8154689f30", [[2400, 600], [2400, 600], [2400, 600], [2400, 600]]),
    "csv-iid-3": ("994f32599c517ab521786aba", [[24, 6], [24, 6], [24, 6]]),
    "csv-dirichlet-2": ("0da052483330e7c302e61412", [[36, 10], [35, 9]]),
    "parquet-iid-2-seed9": ("0f1ab0a7025df1c67e7a6390", [[20, 5], [20, 5]]),
    "folder-iid-2": ("bb30bfc72f574d525ec16fd3", [[24, 6], [24, 6]]),
}
"""name -> (fingerprint, per-node [train, test] sizes), from the previous implementation."""

CENTRAL_EXPECTED: dict[str, str] = {
    "iid-10": "11af9df536927bca307059e7",
    "folder-iid-2": "0309969c495745dc19563c75",
}
"""Fingerprint of the server's held-out set (embedded, hub-style folder), from the previous implementation."""


def make_files(folder: Path) -> dict[str, str]:
    """Small deterministic local datasets: a csv of pixel columns, a parquet of images, a hub-style folder."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (90, 8, 8), dtype=np.uint8), rng.integers(0, 3, 90)
    header = "label," + ",".join(f"pixel{i}" for i in range(64))
    rows = [f"{label}," + ",".join(map(str, image.ravel())) for image, label in zip(images, labels)]
    (folder / "digits.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"image": [image.tolist() for image in images[:50]], "label": labels[:50]}),
        folder / "grid.parquet",
    )
    hub = folder / "hub"
    (hub / "data").mkdir(parents=True)
    for split, part in (("train", slice(0, 60)), ("test", slice(60, 90))):
        pq.write_table(
            pa.table({"pixels": [image.tolist() for image in images[part]], "digit_class": labels[part]}),
            hub / "data" / f"{split}-00000-of-00001.parquet",
        )
    return {"csv": str(folder / "digits.csv"), "parquet": str(folder / "grid.parquet"), "folder": str(hub)}


def run_config(overrides: dict, files: dict[str, str]) -> dict:
    values = {k: v.format(**files) if isinstance(v, str) else v for k, v in overrides.items()}
    return resolve(NumpyBackend(), values)


def fingerprint(config: dict, nodes: int) -> tuple[str, list[list[int]]]:
    digest, sizes = hashlib.sha256(), []
    for node in range(nodes):
        part = load_partition(config, node, nodes)
        for array in (part.x_train, part.y_train, part.x_test, part.y_test):
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        sizes.append([len(part.y_train), len(part.y_test)])
    return digest.hexdigest()[:24], sizes


def central_fingerprint(config: dict) -> str:
    x, y = load_centralized(config)
    digest = hashlib.sha256()
    for array in (x, y):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:24]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_files(tmp_path_factory.mktemp("datasets"))


@pytest.mark.parametrize("name", list(CASES))
def test_partitions_are_the_same_as_before(name: str, files: dict[str, str]) -> None:
    overrides, nodes = CASES[name]
    digest, sizes = fingerprint(run_config(overrides, files), nodes)
    expected_digest, expected_sizes = EXPECTED[name]
    assert sizes == expected_sizes
    assert digest == expected_digest


@pytest.mark.parametrize("name", ["iid-10", "folder-iid-2"])
def test_centralized_set_is_the_same_as_before(name: str, files: dict[str, str]) -> None:
    assert central_fingerprint(run_config(CASES[name][0], files)) == CENTRAL_EXPECTED[name]


if __name__ == "__main__":  # print the fingerprints of the installed implementation
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        made = make_files(Path(tmp))
        found = {name: fingerprint(run_config(o, made), n) for name, (o, n) in CASES.items()}
        central = {name: central_fingerprint(run_config(CASES[name][0], made)) for name in ("iid-10", "folder-iid-2")}
    json.dump({"EXPECTED": found, "CENTRAL_EXPECTED": central}, sys.stdout)


@pytest.mark.parametrize(("size", "nodes"), [(12_000, 10), (12_000, 7), (101, 9), (50, 25), (12_000, 1000), (13, 4)])
def test_iid_blocks_are_flwr_datasets_iid_partitioner(size: int, nodes: int) -> None:
    """The iid plan is computed without importing datasets: it must be IidPartitioner's, node for node."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    from fedplug.data.partition import node_positions

    labels = np.random.default_rng(size).integers(0, 10, size)
    partitioner = IidPartitioner(num_partitions=nodes)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "row": np.arange(size)})
    ours = node_positions(labels, {"partitioner": "iid", "seed": 0}, nodes)
    for node in range(nodes):
        assert np.array_equal(ours[node], partitioner.load_partition(node)["row"])


@pytest.mark.parametrize(("size", "fraction", "seed"), [(2, 0.2, 0), (1200, 0.2, 42), (517, 0.3, 5), (9, 0.5, 1)])
def test_train_test_split_is_datasets_train_test_split(size: int, fraction: float, seed: int) -> None:
    import datasets

    from fedplug.data.partition import split

    parts = datasets.Dataset.from_dict({"row": np.arange(size)}).train_test_split(test_size=fraction, seed=seed)
    train, test = split(size, fraction, seed)
    assert np.array_equal(train, parts["train"]["row"]) and np.array_equal(test, parts["test"]["row"])


SHARED_CHECK = r"""
import json, sys
from test_partitions_unchanged import fingerprint, run_config
overrides, nodes, files = json.loads(sys.argv[1])
print(json.dumps([*fingerprint(run_config(overrides, files), nodes), "datasets" in sys.modules]))
"""


@pytest.mark.parametrize("name", ["csv-dirichlet-2", "shard-4-3shards", "iid-10"])
def test_processes_of_a_run_read_the_shared_data_and_get_the_same_partitions(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the CLI writes into the run folder gives the run's other processes the same partitions.

    The dataset file is deleted before the other process starts: it can only use the shared copy; and
    it must not import ``datasets`` (which partitioning needs).
    """
    import subprocess

    from fedplug.data import share_run_data

    files = make_files(tmp_path)
    overrides, nodes = CASES[name]
    config = run_config({**overrides, "num-supernodes": nodes}, files)
    out = tmp_path / "run"
    share_run_data(config, out)
    Path(files["csv"]).unlink()
    monkeypatch.setenv("FEDPLUG_RUN_DIR", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    done = subprocess.run(
        [sys.executable, "-c", SHARED_CHECK, json.dumps([overrides, nodes, files])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    digest, sizes, imported_datasets = json.loads(done.stdout)
    assert [digest, sizes] == list(EXPECTED[name])
    assert not imported_datasets, "the process partitioned again instead of reading the run's plan"
