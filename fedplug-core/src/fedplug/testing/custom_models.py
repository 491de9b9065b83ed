"""A test of a backend's custom models: the user's CNN module, federated from its own folder on colour images.

A backend that sets ``custom_models`` can test it as fedplug's backends do::

    from fedplug.testing.custom_models import check_custom_model_federation

    def test_custom_cnn(tmp_path):
        check_custom_model_federation("mything", SOURCE, WEIGHT_NAMES, "lr=0.01", "not a mything.Model", tmp_path)

``SOURCE`` (a module's text) defines ``SmallCnn(spec, config)`` (a small CNN for 32x32 RGB images) and
``WrongFramework(spec, config)`` (returning a string). The check writes the module and a
generated 32x32 RGB parquet file (4 classes, told by a faint tint of one quadrant) to a
folder, runs ``fedplug run`` from there (2 nodes, 2 rounds), and asserts: the wrong model
is refused in one line before anything starts; the run learns (the evaluation loss falls,
the accuracy rises to 75% or more); the weights travel under the framework's own names;
the results' Flower App carries the module; the native model file loads back into the
model with the final weights, far more accurate than the initial model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedplug.backend import DataSpec
from fedplug.testing.runs import check_results

CLASSES = 4
SPEC = DataSpec((3, 32, 32), CLASSES)


def colour_images(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """32x32 RGB images ``(N, H, W, 3)`` uint8: noise, and one quadrant tinted by the class's colour.

    The tint is faint against the noise, so that two short rounds show the accuracy rising.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.integers(0, 160, (n, 32, 32, 3))
    tints = np.array([[70, 0, 0], [0, 70, 0], [0, 0, 70], [70, 70, 0]])
    for i, label in enumerate(y):
        row, col = divmod(int(label), 2)
        x[i, row * 16 : row * 16 + 16, col * 16 : col * 16 + 16] += tints[label]
    return np.clip(x, 0, 255).astype(np.uint8), y


def write_parquet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Images ``(N, H, W, C)`` as nested fixed-size lists in column ``image``, labels in ``label``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = pa.array(x.reshape(-1))
    for size in reversed(x.shape[1:]):
        pixels = pa.FixedSizeListArray.from_arrays(pixels, size)
    pq.write_table(pa.table({"image": pixels, "label": pa.array(y)}), path)


def check_custom_model_federation(
    backend_name: str, source: str, weight_names: list[str], run_config: str, wrong_type: str, tmp_path: Path
) -> None:
    """Federate ``source``'s ``SmallCnn`` from its folder with ``backend_name``; assert what the module says."""
    from fedplug.plugins import get_backend

    backend = get_backend(backend_name)
    work = tmp_path / "work"
    work.mkdir()
    module = f"{backend_name}_user_nets"  # one name per backend: this process imports each
    (work / f"{module}.py").write_text(source)
    x, y = colour_images()
    write_parquet(work / "colour.parquet", x, y)

    def fedplug_run(model: str, out: Path) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).with_name("fedplug")), "run", backend_name, "--model", model]
        args = ["--dataset", "colour.parquet", "--nodes", "2", "--rounds", "2", "--run-config", run_config]
        return subprocess.run(
            [*command, *args, "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=work,
            env={**os.environ, "FEDPLUG_PLUGINS": backend_name},
            timeout=900,
        )

    refused = fedplug_run(f"{module}:WrongFramework", tmp_path / "refused")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines() == [
        f"fedplug: error: custom model {module}:WrongFramework returned a builtins.str, {wrong_type}"
    ]
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "out"
    done = fedplug_run(f"./{module}.py:SmallCnn", out)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    rounds = check_results(out, backend.file_suffix)
    first, last = rounds[1], rounds[2]
    assert last["evaluate-loss"] < first["evaluate-loss"], rounds
    assert last["evaluate-accuracy"] >= max(first["evaluate-accuracy"], 0.75), rounds
    with np.load(out / "weights.npz") as saved:
        weights = {name: saved[name] for name in saved.files}
    assert list(weights) == weight_names, "weights travel under the framework's own names, in a stable order"
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == f"{module}:SmallCnn" and config["model-file"] == str(work / f"{module}.py")
    app = out / "flower-app"
    assert (app / f"{module}.py").read_text() == source, "the Flower App carries the module"
    assert f'model-file = "{module}.py"' in (app / "pyproject.toml").read_text()

    # the native file holds the final global model: it loads back and tells the colours apart
    images = (x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    model = backend.build_model(config["model"], SPEC, config)
    before = backend.evaluate(model, images, y, config)["accuracy"]
    model = backend.load(model, out / f"model{backend.file_suffix}")
    after = backend.get_weights(model)
    assert all(np.array_equal(after[name], weights[name]) for name in weight_names)
    accuracy = backend.evaluate(model, images, y, config)["accuracy"]
    assert accuracy >= 0.75 and accuracy > before + 0.3, (before, accuracy)
