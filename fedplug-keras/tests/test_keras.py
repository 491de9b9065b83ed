"""fedplug-keras: quickstart defaults, Keras specifics, a real run, and the conformance suite."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fedplug.backend import BackendUnavailable, DataSpec
from fedplug.config import ConfigError, resolve
from fedplug.numpy_backend import Conv, Dense, Flatten, Pool, Relu
from fedplug.plan import with_preset
from fedplug.testing import BackendConformance
from fedplug.testing.runs import assert_killed_run_resumes_bit_identical, check_results
from fedplug_keras import KerasBackend, framework, nets

GREY = DataSpec((1, 28, 28), 10)
COLOUR = DataSpec((3, 32, 32), 3)
ODD = DataSpec((3, 21, 27), 3)
"""Odd sizes after each conv and pool: the flatten permutation must use the real feature map."""


@pytest.fixture(scope="module")
def backend() -> KerasBackend:
    return KerasBackend()


@pytest.fixture(scope="module")
def config(backend: KerasBackend) -> dict:
    return resolve(backend, {})


@pytest.fixture(scope="module")
def keras(config: dict) -> ModuleType:
    return framework.import_keras(config)


@pytest.fixture(scope="module")
def grey_cnn(backend: KerasBackend, config: dict) -> Any:
    """One compiled model reused by several tests, as one process reuses it across rounds."""
    return backend.build_model("cnn", GREY, config)


def images(spec: DataSpec, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *spec.input_shape), dtype=np.float32)


def labels(spec: DataSpec, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % spec.num_classes


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


# -- contract ------------------------------------------------------------------------------


def test_quickstart_preset(backend: KerasBackend) -> None:
    """--preset quickstart is exactly the Flower quickstart's settings (fedplug 0.1's defaults)."""
    config = resolve(backend, with_preset(backend, "quickstart", {}))
    quickstart = {
        "model": "cnn",
        "optimizer": "adam",  # the quickstart's compile("adam")
        "lr": 0.001,  # the seed's load_model default; its compile("adam") uses Adam's 0.001 too
        "batch-size": 32,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "num-supernodes": 10,
        "fraction-train": 0.5,
        "fraction-evaluate": 1.0,  # the seed's log: "Fraction: train (0.50) | evaluate (1.00)"
        "strategy": "fedavg",
        "partitioner": "iid",
        "test-fraction": 0.2,
        "keras.backend": "tensorflow",
    }
    assert {key: config[key] for key in quickstart} == quickstart
    assert backend.quickstart_dataset == "uoft-cs/cifar10"
    assert backend.framework.import_name == "keras"
    assert backend.models == ("cnn", "mlp", "lenet", "lenet-bn")
    assert backend.file_suffix == ".keras"


def test_quickstart_model_and_optimizer(backend: KerasBackend, config: dict, keras: ModuleType) -> None:
    net = backend.build_model("cnn", COLOUR, config)
    layers = keras.layers
    kinds = [type(layer) for layer in net.layers]
    assert kinds == [
        layers.Conv2D,
        layers.MaxPooling2D,
        layers.Conv2D,
        layers.MaxPooling2D,
        layers.Flatten,
        layers.Dropout,
        layers.Dense,
    ]
    conv1, conv2, dense = net.layers[0], net.layers[2], net.layers[6]
    assert (conv1.filters, conv1.kernel_size, conv2.filters, conv2.kernel_size) == (32, (3, 3), 64, (3, 3))
    assert net.layers[5].rate == 0.5
    assert dense.units == COLOUR.num_classes and dense.activation is keras.activations.linear  # logits
    assert isinstance(net.optimizer, nets.optimizer_class(keras))  # the contract's Adam, not Keras's
    assert isinstance(net.loss, keras.losses.SparseCategoricalCrossentropy)
    backend.train(net, images(COLOUR, 8), labels(COLOUR, 8), {**config, "server-round": 1})
    assert float(net.optimizer.learning_rate) == pytest.approx(0.001)
    assert float(net.optimizer.hyper["adam"]) == 1.0


def test_keras_backend_is_chosen_by_the_run_config(monkeypatch: pytest.MonkeyPatch, keras: ModuleType) -> None:
    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(ConfigError, match=r"keras\.backend"):
        framework.import_keras({"keras.backend": "mxnet"})
    with pytest.raises(BackendUnavailable, match="KERAS_BACKEND=jax"):
        framework.import_keras({"keras.backend": "jax"})  # Keras is imported with TensorFlow already
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.setattr(framework, "is_installed", lambda module: False)
    with pytest.raises(BackendUnavailable, match=r"fedplug-keras\[torch\]"):
        framework.import_keras({"keras.backend": "torch"})


def test_check_available_gives_install_hint(backend: KerasBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    backend.check_available()
    monkeypatch.setattr(framework, "is_installed", lambda module: module == "keras")
    with pytest.raises(BackendUnavailable, match=r"fedplug-keras\[tensorflow-cpu\]"):
        backend.check_available()
    monkeypatch.setattr(framework, "is_installed", lambda module: False)
    with pytest.raises(BackendUnavailable, match="needs Keras 3"):
        backend.check_available()


def test_check_available_with_a_run_config_checks_its_keras_backend(
    backend: KerasBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedplug list` and `fedplug run keras keras.backend=jax` agree: no jax, not available."""
    monkeypatch.setattr(framework, "is_installed", lambda module: module != "jax")
    backend.check_available()  # without a run config: some framework for Keras is installed
    backend.check_available({"keras.backend": "tensorflow"})
    with pytest.raises(BackendUnavailable, match=r"keras\.backend=jax needs jax: pip install 'fedplug-keras\[jax\]'"):
        backend.check_available({"keras.backend": "jax"})


# -- layout: the quickstart's cnn --------------------------------------------------------------


def reference_cnn(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The quickstart's CNN at inference, from canonical weights, with the NumPy backend's layers."""
    w = list(weights.values())
    layers: list[Any] = [
        Conv(w[0], w[1]),
        Relu(),
        Pool("max"),
        Conv(w[2], w[3]),
        Relu(),
        Pool("max"),
        Flatten(),
        Dense(w[4], w[5]),
    ]
    for layer in layers:
        x = layer.forward(x)
    return x  # logits


@pytest.mark.parametrize("spec", [GREY, COLOUR, ODD], ids=str)
def test_cnn_canonical_layout_and_conversion(backend: KerasBackend, config: dict, spec: DataSpec) -> None:
    net = backend.build_model("cnn", spec, config)
    channels, height, width = spec.input_shape
    for _ in range(2):
        height, width = (height - 2) // 2, (width - 2) // 2
    expected = {
        "layers.0.weight": (32, channels, 3, 3),
        "layers.0.bias": (32,),
        "layers.1.weight": (64, 32, 3, 3),
        "layers.1.bias": (64,),
        "layers.2.weight": (spec.num_classes, 64 * height * width),
        "layers.2.bias": (spec.num_classes,),
    }
    got = backend.get_weights(net)
    assert {key: value.shape for key, value in got.items()} == expected
    assert list(got) == list(expected) and all(value.dtype == np.float32 for value in got.values())

    rng = np.random.default_rng(3)
    sent = {
        key: (rng.uniform(-1, 1, shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        for key, shape in expected.items()
    }  # fan-in scaled, so the softmax does not saturate
    backend.set_weights(net, sent)
    np.testing.assert_array_equal(np.asarray(net.layers[0].kernel), sent["layers.0.weight"].transpose(2, 3, 1, 0))
    assert tuple(net.layers[6].kernel.shape) == (64 * height * width, spec.num_classes)  # Keras: (in, out)
    for key, value in backend.get_weights(net).items():
        np.testing.assert_array_equal(value, sent[key])
    x = images(spec, 6)
    expected_scores = reference_cnn(sent, x)
    probabilities = np.exp(expected_scores) / np.exp(expected_scores).sum(axis=1, keepdims=True)
    assert probabilities.max() < 0.9, "saturated scores would hide a wrong feature order"
    np.testing.assert_allclose(backend.predict(net, x), expected_scores, rtol=1e-4, atol=1e-6)


# -- training: compiled once, no growth, restartable ---------------------------------------------


def traced_functions(function: Any) -> list[Any]:
    """The tf.functions a Keras step function closes over."""
    cells = inspect.getclosurevars(function).nonlocals.values()
    return [cell for cell in cells if hasattr(cell, "experimental_get_tracing_count")]


def test_rounds_reuse_one_graph_and_restart_adam(backend: KerasBackend, config: dict, grey_cnn: Any) -> None:
    net = grey_cnn
    start = backend.get_weights(net)
    sizes = (100, 90, 70, 100, 90)  # partition sizes with a partial last batch, as real nodes have
    seen: list[tuple[Any, ...]] = []
    for server_round, n in enumerate(sizes, start=1):
        backend.set_weights(net, start)
        lr = 0.001 * server_round
        backend.train(
            net,
            images(GREY, n, seed=server_round),
            labels(GREY, n),
            {**config, "server-round": server_round, "lr": lr, "batch-size": 32},
        )
        backend.evaluate(net, images(GREY, 20), labels(GREY, 20), config)
        functions = traced_functions(net.train_function)
        assert functions, "found no tf.function in Keras's train_function: the check below would be empty"
        seen.append(
            (
                net.train_function,
                net.test_function,
                len(net.optimizer.variables),
                sum(f.experimental_get_tracing_count() for f in functions),
            )
        )
        assert float(net.optimizer.learning_rate) == pytest.approx(lr)
        assert int(net.optimizer.iterations) == -(-n // 32), "Adam must restart every round"
    first = seen[0]
    assert all(entry[0] is first[0] and entry[1] is first[1] for entry in seen), "Keras recompiled"
    assert [entry[2:] for entry in seen] == [first[2:]] * len(sizes), "graph or optimizer state grew"


def test_later_calls_trace_nothing_and_take_each_calls_lr(
    backend: KerasBackend, config: dict, grey_cnn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given numpy arrays, Keras on TensorFlow maps its input pipeline through functions it traces every call."""
    import tensorflow as tf

    net, x, y = grey_cnn, images(GREY, 70), labels(GREY, 70)
    start = backend.get_weights(net)
    backend.train(net, x, y, {**config, "server-round": 1, "lr": 0.01})
    backend.evaluate(net, x, y, config)
    backend.predict(net, x[:5])
    steps = traced_functions(net.train_function) + traced_functions(net.test_function)
    traces = sum(f.experimental_get_tracing_count() for f in steps)
    mapped: list[object] = []
    original_map = tf.data.Dataset.map

    def counting_map(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        mapped.append(args[0] if args else kwargs.get("map_func"))
        return original_map(dataset, *args, **kwargs)

    monkeypatch.setattr(tf.data.Dataset, "map", counting_map)
    backend.set_weights(net, start)
    backend.train(net, x, y, {**config, "server-round": 2, "lr": 0.0})
    unchanged = backend.get_weights(net)
    backend.evaluate(net, x, y, config)
    backend.predict(net, x[:5])
    assert mapped == [], "each call traced tf.data functions for its input pipeline"
    assert sum(f.experimental_get_tracing_count() for f in steps) == traces, "a later call retraced a step"
    for key, value in unchanged.items():
        np.testing.assert_array_equal(value, start[key], err_msg="lr=0 must leave the weights unchanged")


def test_train_depends_only_on_weights_data_and_config(backend: KerasBackend, config: dict, grey_cnn: Any) -> None:
    """A process trains many nodes in turn: earlier calls must not change a later one's result."""
    net = grey_cnn
    start, x, y = backend.get_weights(net), images(GREY, 64), labels(GREY, 64)
    cfg = {**config, "server-round": 3}
    backend.train(net, x, y, cfg)
    first = backend.get_weights(net)
    backend.train(net, images(GREY, 48, seed=5), labels(GREY, 48), {**config, "server-round": 4})
    backend.set_weights(net, start)
    backend.train(net, x, y, cfg)
    for key, value in backend.get_weights(net).items():
        np.testing.assert_array_equal(value, first[key])
    backend.set_weights(net, start)
    backend.train(net, x, y, {**cfg, "server-round": 4})
    assert not np.array_equal(backend.get_weights(net)["layers.2.weight"], first["layers.2.weight"]), (
        "shuffling and dropout must change with the round"
    )


# -- native format --------------------------------------------------------------------------


def test_saves_native_keras_archive(backend: KerasBackend, config: dict, keras: ModuleType, tmp_path: Path) -> None:
    net = backend.build_model("lenet", COLOUR, config)
    x = images(COLOUR, 8)
    backend.train(net, x, labels(COLOUR, 8), {**config, "server-round": 1})
    path = tmp_path / "model.keras"
    backend.save(net, path)
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert {"config.json", "model.weights.h5"} <= set(zipfile.ZipFile(path).namelist())
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x.transpose(0, 2, 3, 1), verbose=0), backend.predict(net, x))


# -- processes: light import, quiet TensorFlow, other Keras backends ---------------------------------

QUIET_RUN = """
import sys
import numpy as np
import fedplug_keras
from fedplug.backend import DataSpec
from fedplug.config import resolve
heavy = [m for m in ("keras", "tensorflow", "jax", "torch") if m in sys.modules]
assert not heavy, f"importing the plugin imported {heavy}"
backend = fedplug_keras.KerasBackend()
config = {**resolve(backend, %(overrides)r), "server-round": 1}
spec = DataSpec((3, 32, 32), 3)
net = backend.build_model(config["model"], spec, config)
x = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
y = np.arange(16) %% 3
backend.train(net, x, y, config)
backend.evaluate(net, x, y, config)
import keras
print(keras.backend.backend(), backend.predict(net, x).shape)
"""


def test_tensorflow_backend_is_explicit_and_quiet() -> None:
    done = run_python(QUIET_RUN % {"overrides": {}}, KERAS_BACKEND="jax")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["tensorflow", "(16,", "3)"], "the run config, not KERAS_BACKEND, decides"
    assert done.stderr == "", f"TensorFlow chatter reached the terminal:\n{done.stderr}"


# -- end to end ---------------------------------------------------------------------------------


def test_fedplug_run_two_rounds(run_fedplug: Any) -> None:
    # the quickstart's CNN and Adam; 2 of 8 nodes train and evaluate each round (sampled, as in the quickstart)
    args = ("--rounds", "2", "--nodes", "8", "--fraction-train", "0.25", "--fraction-evaluate", "0.25")
    proc, out = run_fedplug("keras", *args)
    rounds = check_results(out, ".keras")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"] + 0.3
    assert rounds[-1]["evaluate-accuracy"] > 0.5
    assert "oneDNN" not in proc.stdout + proc.stderr
    assert_killed_run_resumes_bit_identical("keras", out, args, None)  # .keras files carry their save date


def test_killed_fedadam_run_resumes_bit_identical(run_fedplug: Any) -> None:
    """SIGKILL after round 1 of 3, resumed: bit-identical to the uninterrupted run, with the server optimiser's
    state and seeded sampling of half the nodes (the quickstart run above covers FedAvg)."""
    args = ("--rounds", "3", "--nodes", "4", "--fraction-train", "0.5", "--model", "mlp", "--strategy", "fedadam",
            "--run-config", "hidden-dims='16'")  # fmt: skip
    _, out = run_fedplug("keras", *args)
    assert_killed_run_resumes_bit_identical("keras", out, args, None)


def test_keras_backend_from_the_run_config_reaches_every_client(run_fedplug: Any) -> None:
    """Whatever KERAS_BACKEND says, the backend's environment() sets it before Flower starts."""
    _, out = run_fedplug(
        "keras",
        "--rounds",
        "1",
        "--nodes",
        "2",
        "--model",
        "mlp",
        "--run-config",
        "keras.backend='jax' hidden-dims='16'",
        env={"KERAS_BACKEND": "tensorflow"},
    )
    rounds = check_results(out, ".keras")
    assert rounds[-1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"]
    assert json.loads((out / "config.json").read_text())["keras.backend"] == "jax"


def test_unknown_keras_backend_is_refused_before_the_run(backend: KerasBackend) -> None:
    with pytest.raises(ConfigError, match=r"run-config 'keras\.backend' must be one of tensorflow, jax, torch"):
        resolve(backend, {"keras.backend": "mxnet"})
    assert backend.environment(resolve(backend, {"keras.backend": "torch"})) == {"KERAS_BACKEND": "torch"}
    with pytest.raises(ConfigError, match=r"unknown run-config key 'keras\.backends'; did you mean 'keras\.backend'"):
        resolve(backend, {"keras.backends": "jax"})


def test_the_former_keras_backend_key_is_refused_in_one_line_naming_the_new_one(tmp_path: Path) -> None:
    from fedplug.testing.runs import fedplug

    out = tmp_path / "never"
    done = fedplug(
        "run", "keras", "--run-config", "keras-backend=jax", "--out", str(out), env={"FEDPLUG_PLUGINS": "keras"}
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line == "fedplug: error: run-config 'keras-backend' is now 'keras.backend': write keras.backend='jax'"
    assert not out.exists(), "nothing may start"


def test_fedprox_and_sgd_are_accepted(backend: KerasBackend) -> None:
    """Keras applies FedProx's term and SGD now (the conformance suite checks how): the run checks accept them."""
    assert "proximal-mu" not in backend.unsupported
    config = resolve(backend, {"strategy": "fedprox", "optimizer": "sgd", "momentum": 0.9})
    assert (config["strategy"], config["optimizer"]) == ("fedprox", "sgd")


class TestConformance(BackendConformance):
    backend_name = "keras"


def test_the_default_run_learns(run_fedplug) -> None:
    """`fedplug run keras` with no options learns on the embedded digits (docs/performance.md: the benchmark
    holds the 85% target; this test a softer floor)."""
    _, out = run_fedplug("keras")
    rounds = check_results(out, ".keras")
    assert rounds[-1]["centralized-accuracy"] >= 0.8, [r.get("centralized-accuracy") for r in rounds]
