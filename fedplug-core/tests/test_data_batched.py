"""A local parquet file is decoded in batches (issue 29): the same arrays as ``pq.read_table``, bit for bit."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fedplug.data import sources


def nested(images: np.ndarray) -> pa.Array:
    """``(N, H, W)`` as a list<list<pixel>> column (the benchmark's fixed-size lists, or variable lists)."""
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), images.shape[2])
    return pa.FixedSizeListArray.from_arrays(flat, images.shape[1])


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.fast
@pytest.mark.parametrize("layout", ["fixed-size uint8", "lists of floats", "encoded images", "pixel columns"])
def test_a_parquet_file_read_in_batches_gives_the_arrays_of_read_table(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    rows = 50
    images = rng.integers(0, 256, size=(rows, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, size=rows)
    if layout == "fixed-size uint8":
        columns = {"image": nested(images)}
    elif layout == "lists of floats":
        columns = {"image": pa.array((images / 255.0).astype(np.float32).tolist())}
    elif layout == "encoded images":
        columns = {"image": pa.array([{"bytes": png(image), "path": None} for image in images])}
    else:
        columns = {f"pixel{i}": pa.array(images.reshape(rows, -1)[:, i]) for i in range(16)}
    table = pa.table({**columns, "label": pa.array(labels)})
    features = {"label": {"_type": "ClassLabel", "names": ["a", "b", "c", "d"]}}  # as datasets writes it
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=20)  # several row groups
    monkeypatch.setattr(sources, "READ_BATCH_ROWS", 7)  # several batches per row group, and across them

    image_column = "" if layout == "pixel columns" else "image"
    batched = sources.load(str(path), 3, image_column, "label")
    whole = pq.read_table(path)  # the former reading
    expected = sources.table_images(whole, image_column, "label")
    assert batched.x_train.dtype == expected.dtype and batched.x_train.shape == expected.shape
    assert batched.x_train.tobytes() == expected.tobytes()
    assert np.array_equal(batched.y_train, sources.table_labels(whole, "label"))
    assert batched.spec.num_classes == 4  # the declared classes (the file's metadata) are read as before
