"""Custom models (``--model my_nets:Factory``): refusals in one line, and one real federation per framework.

The fast tests run the core's checks in-process with a test backend whose "framework" is
NumPy (the reference ``NumpyModel``), so they import no ML framework. The federations
write a small CNN module of their own to a temporary folder and run ``fedplug`` from that
folder, on a generated 32x32 RGB parquet file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import check_results
from fedplug.backend import Config, CustomModel, DataSpec, ModelError
from fedplug.config import ConfigError, resolve
from fedplug.custom import check_same_backend, load_factory, locate
from fedplug.numpy_backend import NumpyBackend, NumpyImplementation, NumpyModel

FEDPLUG = str(Path(sys.executable).with_name("fedplug"))
SPEC = DataSpec((3, 8, 8), 4)


class ArrayImplementation(NumpyImplementation):
    """The numpy reference, taking custom ``NumpyModel``s as a framework backend takes its own type."""

    def build_custom(self, make: Callable[[], Any], spec: DataSpec, config: Config) -> Any:
        net = make()
        if not isinstance(net, NumpyModel):
            raise ModelError(f"custom model {config['model']} returned a {type(net).__name__}, not a NumpyModel")
        return net

    def get_native_weights(self, model: NumpyModel) -> dict[str, np.ndarray]:
        return self.get_weights(model)

    def set_native_weights(self, model: NumpyModel, weights: dict[str, np.ndarray]) -> None:
        self.set_weights(model, weights)


class ArrayBackend(NumpyBackend):
    custom_models = "a fedplug.numpy_backend.NumpyModel (a test double for a framework's model type)"


@pytest.fixture
def backend() -> ArrayBackend:
    chosen = ArrayBackend()
    chosen.__dict__["impl"] = ArrayImplementation(chosen)  # the cached implementation, set directly
    return chosen


MODULE = """
import numpy as np
from fedplug.numpy_backend import NumpyImplementation, NumpyBackend

def Mlp(spec, config):
    return NumpyImplementation(NumpyBackend()).build_model("mlp", spec, {**config, "hidden-dims": "16"})

def Raises(spec, config):
    raise ValueError(f"depth must be even, got {spec.num_classes}")

def WrongType(spec, config):
    return {"not": "a model"}

def WrongClasses(spec, config):
    return NumpyImplementation(NumpyBackend()).build_model("mlp", type(spec)(spec.input_shape, 3), config)

NOT_CALLABLE = 3
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding the module ``fast_nets.py`` (a name unique to these tests)."""
    (tmp_path / "fast_nets.py").write_text(MODULE)
    (tmp_path / "raising_nets.py").write_text("raise RuntimeError('no GPU here')\n")
    (tmp_path / "json.py").write_text("def F(spec, config):\n    return None\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folders the loader adds go away after the test
    for name in ("fast_nets", "raising_nets"):  # each test's own copy of the module, as in a fresh process
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def build(backend: ArrayBackend, ref: str, work: Path) -> Any:
    config = resolve(backend, {"model": ref, "hidden-dims": "16"})
    config["model"], config["model-file"] = locate(ref, work)
    return backend.build_model(str(config["model"]), SPEC, config)


@pytest.mark.fast
def test_custom_model_builds_and_checks_every_set(backend: ArrayBackend, work: Path) -> None:
    model = build(backend, "./fast_nets.py:Mlp", work)
    assert isinstance(model, CustomModel) and model.ref == "fast_nets:Mlp"
    weights = backend.get_weights(model)
    assert [name for name, _ in model.layout] == list(weights)
    backend.set_weights(model, weights)
    assert backend.predict(model, np.zeros((5, *SPEC.input_shape), np.float32)).shape == (5, 4)
    with pytest.raises(ValueError, match=r"layers.0.weight has shape \(16, 3\), the model's is \(16, 192\)"):
        backend.set_weights(model, {**weights, "layers.0.weight": np.zeros((16, 3), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        backend.set_weights(model, dict(list(weights.items())[1:]))
    with pytest.raises(ValueError, match="another order"):
        backend.set_weights(model, dict(reversed(weights.items())))


@pytest.mark.fast
@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_module:Net", "no module 'no_such_module' in"),
        ("./nowhere.py:Net", "there is no file"),
        ("fast_nets:Missing", "module 'fast_nets'"),
        ("fast_nets:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable factory"),
        ("raising_nets:Net", "importing the module of custom model raising_nets:Net raised RuntimeError: no GPU here"),
        ("json:F", "'import json' finds"),
        ("fast_nets:Raises", "raised ValueError: depth must be even, got 4"),
        ("fast_nets:WrongType", "returned a dict, not a NumpyModel"),
        ("fast_nets:WrongClasses", "returns shape (2, 3) for a batch of 2 images; it must return (2, 4) logits"),
    ],
)
def test_custom_model_mistakes_are_one_line(backend: ArrayBackend, work: Path, ref: str, message: str) -> None:
    with pytest.raises(ModelError) as caught:
        build(backend, ref, work)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("fast_nets:", "is not module:factory"),
        ("fast nets:Net", "neither a module name"),
        ("fast_nets:1Net", "is not module:factory"),
    ],
)
def test_malformed_reference_is_a_config_error(backend: ArrayBackend, ref: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(backend, {"model": ref})


@pytest.mark.fast
def test_backend_without_custom_models_refuses_them() -> None:
    with pytest.raises(ConfigError, match="backend 'numpy' cannot federate custom models"):
        resolve(NumpyBackend(), {"model": "my_nets:Net"})


@pytest.mark.fast
def test_node_of_another_framework_is_refused() -> None:
    config = {"backend": "torch", "model": "my_nets:Net"}
    with pytest.raises(ModelError, match="this node runs backend 'jax' but the run federates the custom torch model"):
        check_same_backend(config, "jax")
    check_same_backend({"backend": "torch", "model": "lenet"}, "jax")  # the shared models map between frameworks


@pytest.mark.fast
def test_flower_app_imports_the_module_by_name_where_its_path_is_gone(work: Path) -> None:
    """A Flower App on another machine: ``model-file`` is relative, Flower puts the app folder on sys.path."""
    sys.path.insert(0, str(work))
    try:
        factory = load_factory({"model": "fast_nets:Mlp", "model-file": "fast_nets.py"})
    finally:
        sys.path.remove(str(work))
    assert factory.__module__ == "fast_nets"


@pytest.mark.fast
def test_cli_refuses_a_missing_module_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [FEDPLUG, "run", "numpy", "--model", "my_nets:Net", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "FEDPLUG_PLUGINS": ""},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "fedplug: error: backend 'numpy' cannot federate custom models (my_nets:Net); choose one of: mlp, lenet"
    ]
    assert not (tmp_path / "out").exists()


# --- one federation per framework ---------------------------------------------------------------

CLASSES = 4


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    pixels = pa.array(x.reshape(-1))
    for size in (3, 32, 32):  # nested fixed-size lists (N, 32, 32, 3), as numpy images are stored
        pixels = pa.FixedSizeListArray.from_arrays(pixels, size)
    pq.write_table(pa.table({"image": pixels, "label": pa.array(y)}), path)


NETS = {
    "torch": """
import torch
from torch import nn


def SmallCnn(spec, config):
    channels, height, width = spec.input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * (height // 4) * (width // 4), spec.num_classes),
    )


def WrongFramework(spec, config):
    return "a string"
""",
    "keras": """
import keras


def SmallCnn(spec, config):
    channels, height, width = spec.input_shape
    layers = keras.layers
    return keras.Sequential([
        keras.Input((height, width, channels)),
        layers.Conv2D(8, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dense(spec.num_classes),
    ])


def WrongFramework(spec, config):
    return "a string"
""",
    "jax": """
import jax.numpy as jnp
from flax import nnx


class SmallCnn(nnx.Module):
    def __init__(self, spec, config):
        channels, height, width = spec.input_shape
        rngs = nnx.Rngs(config["seed"])
        self.conv1 = nnx.Conv(channels, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.head = nnx.Linear(16 * (height // 4) * (width // 4), spec.num_classes, rngs=rngs)

    def __call__(self, x):
        x = jnp.transpose(x, (0, 2, 3, 1))
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def WrongFramework(spec, config):
    return "a string"
""",
    "mlx": """
import mlx.nn as nn


class SmallCnn(nn.Module):
    def __init__(self, spec, config):
        super().__init__()
        channels, height, width = spec.input_shape
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.head = nn.Linear(16 * (height // 4) * (width // 4), spec.num_classes)

    def __call__(self, x):
        x = self.pool(nn.relu(self.conv1(x)))
        x = self.pool(nn.relu(self.conv2(x)))
        return self.head(x.reshape(x.shape[0], -1))


def WrongFramework(spec, config):
    return "a string"
""",
}
FRAMEWORK = {
    "torch": ("not a torch.nn.Module", ".pt", ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"]),
    "keras": (
        "not a keras.Model",
        ".keras",
        ["layers.0.kernel", "layers.0.bias", "layers.2.kernel", "layers.2.bias", "layers.5.kernel", "layers.5.bias"],
    ),
    "jax": (
        "not a flax.nnx.Module",
        ".msgpack",
        ["conv1.bias", "conv1.kernel", "conv2.bias", "conv2.kernel", "head.bias", "head.kernel"],
    ),
    "mlx": (
        "not an mlx.nn.Module",
        ".safetensors",
        ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "head.weight", "head.bias"],
    ),
}
RUN_CONFIG = {  # each backend's optimiser, at a rate that learns the tints in two rounds
    "torch": "lr=0.02 batch-size=16 local-epochs=2",
    "keras": "lr=0.002 batch-size=16 local-epochs=2",
    "jax": "lr=0.02 batch-size=16 local-epochs=2",
    "mlx": "lr=0.1 batch-size=16 local-epochs=2",
}


@pytest.mark.parametrize("framework", list(NETS))
def test_custom_cnn_federated_from_its_folder_on_colour_images(framework: str, tmp_path: Path) -> None:
    """The user's CNN module in the working folder, 32x32 RGB parquet, 2 nodes, 2 rounds: it learns,
    its weights travel under the framework's names, the Flower App carries the module, and the native
    model file loads back into the model with the final weights."""
    from fedplug.plugins import get_backend

    work = tmp_path / "work"
    work.mkdir()
    module = f"{framework}_user_nets"  # one name per framework: the test process imports each
    (work / f"{module}.py").write_text(NETS[framework])
    x, y = colour_images()
    write_parquet(work / "colour.parquet", x, y)
    wrong_type, suffix, names = FRAMEWORK[framework]

    def fedplug_run(model: str, out: Path) -> subprocess.CompletedProcess[str]:
        args = ["--model", model, "--dataset", "colour.parquet", "--nodes", "2", "--rounds", "2"]
        return subprocess.run(
            [FEDPLUG, "run", framework, *args, "--run-config", RUN_CONFIG[framework], "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=work,
            env={**os.environ, "FEDPLUG_PLUGINS": framework},
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
    rounds = check_results(out, suffix)
    first, last = rounds[1], rounds[2]
    assert last["evaluate-loss"] < first["evaluate-loss"], rounds
    assert last["evaluate-accuracy"] >= max(first["evaluate-accuracy"], 0.75), rounds
    with np.load(out / "weights.npz") as saved:
        weights = {name: saved[name] for name in saved.files}
    assert list(weights) == names, "weights travel under the framework's own names, in a stable order"
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == f"{module}:SmallCnn" and config["model-file"] == str(work / f"{module}.py")
    app = out / "flower-app"
    assert (app / f"{module}.py").read_text() == NETS[framework], "the Flower App carries the module"
    assert f'model-file = "{module}.py"' in (app / "pyproject.toml").read_text()

    # the native file holds the final global model: it loads back and classifies the colours
    backend = get_backend(framework)
    images = (x.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    model = backend.build_model(config["model"], DataSpec((3, 32, 32), CLASSES), config)
    before = backend.evaluate(model, images, y, config)["accuracy"]
    model = backend.load(model, out / f"model{suffix}")
    after = backend.get_weights(model)
    assert all(np.array_equal(after[name], weights[name]) for name in names)
    accuracy = backend.evaluate(model, images, y, config)["accuracy"]
    assert accuracy >= 0.75 and accuracy > before + 0.3, (before, accuracy)
