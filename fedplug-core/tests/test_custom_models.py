"""Custom models (``--model my_nets:Factory``): the core's checks, each mistake in one line.

They run in-process with a test backend whose "framework" is NumPy (the reference
``NumpyModel``), so they import no ML framework. Each backend's own tests federate a
custom CNN for real (``fedplug.testing.custom_models``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedplug.backend import Config, CustomModel, DataSpec, ModelError
from fedplug.config import ConfigError, resolve
from fedplug.custom import check_same_backend, load_factory, locate
from fedplug.numpy_backend import NumpyBackend, NumpyImplementation, NumpyModel
from fedplug.testing.runs import cli

pytestmark = pytest.mark.fast
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


def test_backend_without_custom_models_refuses_them() -> None:
    with pytest.raises(ConfigError, match="backend 'numpy' cannot federate custom models"):
        resolve(NumpyBackend(), {"model": "my_nets:Net"})


def test_node_of_another_framework_is_refused() -> None:
    config = {"backend": "torch", "model": "my_nets:Net"}
    with pytest.raises(ModelError, match="this node runs backend 'jax' but the run federates the custom torch model"):
        check_same_backend(config, "jax")
    check_same_backend({"backend": "torch", "model": "lenet"}, "jax")  # the shared models map between frameworks


def test_flower_app_imports_the_module_by_name_where_its_path_is_gone(work: Path) -> None:
    """A Flower App on another machine: ``model-file`` is relative, Flower puts the app folder on sys.path."""
    sys.path.insert(0, str(work))
    try:
        factory = load_factory({"model": "fast_nets:Mlp", "model-file": "fast_nets.py"})
    finally:
        sys.path.remove(str(work))
    assert factory.__module__ == "fast_nets"


def test_cli_refuses_custom_models_of_a_backend_without_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    done = cli("run", "numpy", "--model", "my_nets:Net", "--out", str(tmp_path / "out"), env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "fedplug: error: backend 'numpy' cannot federate custom models (my_nets:Net); "
        "choose one of: mlp, lenet, lenet-bn"
    ]
    assert not (tmp_path / "out").exists()


def test_mixed_framework_federation_of_a_custom_model_is_refused(backend: ArrayBackend) -> None:
    """``node-backends`` (nodes of several frameworks): a custom model's weights have no canonical layout."""
    from fedplug.config import check_custom_model

    with pytest.raises(ConfigError, match=r"cannot be federated across frameworks \(node-backends\)"):
        check_custom_model(backend, {"model": "my_nets:Net", "node-backends": "torch,jax"})
    check_custom_model(backend, {"model": "my_nets:Net", "node-backends": ""})


def test_info_says_when_a_backend_takes_no_custom_models() -> None:
    done = cli("info", "numpy", env={"FEDPLUG_PLUGINS": "", "COLUMNS": "200"})
    assert done.returncode == 0
    assert "custom models: not supported by this backend" in done.stdout
