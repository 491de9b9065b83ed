"""Broken datasets and impossible node counts are refused by the CLI before anything starts.

Each case runs ``fedplug run numpy`` on a small file the test writes, and asserts exit code 2,
exactly one stderr line (``fedplug: error: ...``) with the expected hint, no traceback, and no
results folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedplug.testing.runs import cli as fedplug


def csv(rows: list[str], header: str = "label,p0,p1,p2,p3") -> Callable[[Path], str]:
    def write(folder: Path) -> str:
        path = folder / "data.csv"
        path.write_text("\n".join([header, *rows]) + "\n")
        return str(path)

    return write


def digits(n: int, labels: list | None = None) -> list[str]:
    """``n`` csv rows of 2x2 images with labels 0..2 (or ``labels``)."""
    return [f"{labels[i] if labels else i % 3},{i % 7},{i % 5},3,200" for i in range(n)]


def parquet(columns: dict[str, list], classes: int | None = None) -> Callable[[Path], str]:
    def write(folder: Path) -> str:
        table = pa.table(columns)
        if classes is not None:  # as `datasets` writes a ClassLabel column
            features = {"label": {"_type": "ClassLabel", "names": [str(i) for i in range(classes)]}}
            table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        path = folder / "data.parquet"
        pq.write_table(table, path)
        return str(path)

    return write


def grids(n: int, value: float = 7.0) -> list:
    return [[[value, 1.0], [2.0, 3.0]] for _ in range(n)]


def garbage(folder: Path) -> str:
    (folder / "data.parquet").write_bytes(b"this is not a parquet file")
    return str(folder / "data.parquet")


def missing(folder: Path) -> str:
    return str(folder / "nope.parquet")


def embedded(folder: Path) -> str:
    return "embedded"


pytestmark = pytest.mark.fast

CASES: list[tuple[str, Callable[[Path], str], list[str], str]] = [
    ("csv-text-label", csv(digits(20, ["cat"] * 20)), [], "not class ids"),
    ("csv-text-pixel", csv([*digits(19), "1,a,b,c,d"]), [], "pixel column 'p0' holds string values"),
    ("csv-float-label", csv(digits(20, [0.5] * 20)), [], "non-integer values like 0.5"),
    ("csv-negative-label", csv(digits(20, [-1] + [1] * 19)), [], "negative labels like -1"),
    ("csv-missing-label", csv([*digits(19), ",1,2,3,4"]), [], "missing values"),
    ("csv-nan-pixel", csv([*digits(19), "1,nan,2,3,4"]), [], "column 'p0' has 1 missing or NaN values"),
    ("csv-not-square", csv(["1,2,3,4"] * 20, header="label,p0,p1,p2"), [], "as a square image"),
    ("csv-empty", csv([]), [], "has no examples"),
    (
        "csv-too-few-per-node",
        csv(digits(20)),
        ["--nodes", "11"],
        "each node needs at least 2 examples for its train/test split (test-fraction 0.2); use --nodes 10 or fewer",
    ),
    (
        "csv-too-few-test-fraction",
        csv(digits(20)),
        ["--nodes", "5", "--run-config", "test-fraction=0.8"],
        "at least 5 examples",
    ),
    ("parquet-string-images", parquet({"image": ["a.png"] * 20, "label": [1] * 20}), [], "holds text like 'a.png'"),
    (
        "parquet-label-out-of-range",
        parquet({"image": grids(20), "label": [0, 5] * 10}, classes=3),
        [],
        "label 5 is out of range for 3 classes",
    ),
    ("parquet-nan-pixels", parquet({"image": grids(20, np.nan), "label": [0] * 20}), [], "non-finite pixel values"),
    ("parquet-inf-pixels", parquet({"image": grids(20, np.inf), "label": [0] * 20}), [], "non-finite pixel values"),
    (
        "parquet-float-label-not-truncated",
        parquet({"image": grids(20), "label": [1.5] * 20}),
        [],
        "non-integer values like 1.5",
    ),
    ("parquet-unreadable", garbage, [], "cannot read dataset file"),
    ("missing-file", missing, [], "does not exist"),
    (
        "dirichlet-cannot-partition",
        csv(digits(30)),
        ["--nodes", "5", "--partitioner", "dirichlet"],
        "partitioner 'dirichlet' cannot make 5 partitions",
    ),
    (
        "embedded-10000-nodes",
        embedded,
        ["--nodes", "10000"],
        "10000 nodes are too many for dataset 'embedded' (12000 training examples)",
    ),
]


@pytest.mark.parametrize(("name", "make", "args", "hint"), CASES, ids=[case[0] for case in CASES])
def test_bad_data_is_refused_before_the_run(
    name: str, make: Callable[[Path], str], args: list[str], hint: str, tmp_path: Path
) -> None:
    dataset, out = make(tmp_path), tmp_path / "results"
    done = fedplug("run", "numpy", "--dataset", dataset, "--out", str(out), *args, env={"FEDPLUG_PLUGINS": ""})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("fedplug: error: "), done.stderr
    assert hint in lines[0]
    assert not out.exists(), "a results folder was made for a run that never started"
