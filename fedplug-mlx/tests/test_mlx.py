"""Tests of fedplug-mlx: the quickstart-mlx defaults, MLX's layouts, training details, platforms.

The generic checks (canonical layout, agreement with the NumPy backend, save/load,
determinism, the ClientApp) come from fedplug's conformance suite at the end.
"""

from __future__ import annotations

import json
import platform
import struct
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from fedplug import BackendUnavailable, DataSpec
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.plan import with_preset
from fedplug.plugins import get_backend
from fedplug.testing import BackendConformance
from fedplug.testing.runs import assert_killed_run_resumes_bit_identical, check_results, fedplug
from fedplug.toolkit import TrainSettings, canonical_shapes
from fedplug_mlx import MlxBackend

GREY, COLOUR = DataSpec((1, 28, 28), 10), DataSpec((3, 32, 32), 3)


@pytest.fixture(scope="module")
def backend() -> MlxBackend:
    return MlxBackend()


@pytest.fixture(scope="module")
def config(backend: MlxBackend) -> dict:
    return resolve(backend, {})


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """512 real MNIST digits from fedplug-core's embedded set, as the backend receives them."""
    with resources.files("fedplug.data").joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        images, labels = npz["train_images"][:512], npz["train_labels"][:512]
    return (images[:, None] / np.float32(255)).astype(np.float32), labels.astype(np.int64)


def python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


# -- the quickstart it reproduces ------------------------------------------------------


def test_quickstart_preset_reproduces_quickstart_mlx(backend: MlxBackend) -> None:
    """--preset quickstart is exactly the Flower quickstart's settings (fedplug 0.1's defaults)."""
    config = resolve(backend, with_preset(backend, "quickstart", {}))
    # flwr new @flwrlabs/quickstart-mlx: num-layers 2, hidden-dim 32, batch-size 256, lr 0.1,
    # local-epochs 1, 3 rounds, 10 supernodes, FedAvg() with its default fractions
    assert get_backend("mlx").name == backend.name == "mlx"
    quickstart = {
        "model": "mlp",
        "hidden-dims": "32,32",
        "lr": 0.1,
        "batch-size": 256,
        "local-epochs": 1,
        "num-server-rounds": 3,
        "num-supernodes": 10,
        "fraction-train": 1.0,
        "fraction-evaluate": 1.0,
        "strategy": "fedavg",
    }
    assert {key: config[key] for key in quickstart} == quickstart
    assert backend.quickstart_dataset == "ylecun/mnist"
    assert backend.framework.import_name == "mlx"
    assert backend.file_suffix == ".safetensors"
    shapes = canonical_shapes("mlp", GREY, config)
    assert [shapes[f"layers.{i}.weight"] for i in range(3)] == [(32, 784), (32, 32), (10, 32)]


def test_sgd_takes_each_rounds_learning_rate(backend: MlxBackend, config: dict, digits) -> None:
    import mlx.optimizers as optim

    from fedplug_mlx import training

    x, y = digits
    model = backend.build_model("mlp", GREY, config)
    first = {**config, "lr": 0.05, "server-round": 1}
    backend.train(model, x, y, first)
    trainer = training.trainer(model, TrainSettings.from_config(first))
    assert type(trainer.optimizer) is optim.SGD and trainer.optimizer.momentum == 0.0
    assert trainer.optimizer.learning_rate.item() == pytest.approx(0.05)
    before = backend.get_weights(model)
    second = {**config, "lr": 0.0, "server-round": 2}
    backend.train(model, x, y, second)
    assert training.trainer(model, TrainSettings.from_config(second)) is trainer, "one trainer per model and optimiser"
    for key, value in backend.get_weights(model).items():
        np.testing.assert_array_equal(value, before[key], err_msg="lr=0 must leave the weights unchanged")


def test_compiled_step_traces_once_per_batch_shape() -> None:
    # The GPU path, run on the CPU in a child process (MLX compiles CPU kernels with g++).
    done = python("""
        import numpy as np, mlx.core as mx
        from fedplug import DataSpec
        from fedplug_mlx import MlxBackend, training
        from fedplug.config import resolve
        from fedplug.toolkit import TrainSettings
        traces = []
        traced_loss = training.proximal_loss
        def counting_loss(*args):
            traces.append(args[1].shape)
            return traced_loss(*args)
        training.proximal_loss = counting_loss
        backend = MlxBackend()
        config = {**resolve(backend, {}), "batch-size": 64}
        spec = DataSpec((1, 28, 28), 10)
        rng = np.random.default_rng(0)
        x, y = rng.random((200, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 200)
        runs = {}
        for compiled in (True, False):
            model = backend.build_model("lenet", spec, config)
            start = backend.get_weights(model)
            step = training.Trainer(model, "sgd", 0.9, compiled=compiled)
            for server_round, lr, decay in ((1, 0.1, 0.0), (2, 0.05, 0.01)):
                backend.set_weights(model, start)
                round_config = {**config, "lr": lr, "weight-decay": decay, "server-round": server_round}
                step.fit(model.native_input(x), training.labels(y), TrainSettings.from_config(round_config))
            runs[compiled] = backend.get_weights(model)
            if compiled:
                print(len(traces))
        print(max(float(np.abs(runs[True][k] - runs[False][k]).max()) for k in runs[True]))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    traces, difference = done.stdout.split()
    assert int(traces) == 2, "batches of 64 and a last one of 8: two traces, none for new weights, lr or decay"
    assert float(difference) < 1e-5, "the compiled step must compute what the plain one does"


# -- MLX's layouts and the canonical one ---------------------------------------------------


def test_conv_weights_convert_from_channels_last(backend: MlxBackend, config: dict) -> None:
    model = backend.build_model("lenet", COLOUR, config)
    native = np.array(model.layers[0].weight)
    assert native.shape == (6, 5, 5, 3), "MLX conv weights are (out, kh, kw, in)"
    weights = backend.get_weights(model)
    np.testing.assert_array_equal(weights["layers.0.weight"], native.transpose(0, 3, 1, 2))
    weights["layers.0.weight"] = np.arange(6 * 3 * 5 * 5, dtype=np.float32).reshape(6, 3, 5, 5)
    backend.set_weights(model, weights)
    np.testing.assert_array_equal(np.array(model.layers[0].weight), weights["layers.0.weight"].transpose(0, 2, 3, 1))


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("spec", [DataSpec((3, 30, 33), 4), DataSpec((1, 17, 16), 2)], ids=str)
def test_lenet_matches_numpy_on_odd_image_sizes(backend: MlxBackend, config: dict, spec: DataSpec, pool: str) -> None:
    reference = NumpyBackend()
    cfg = {**config, "pool": pool}
    numpy_model, model = reference.build_model("lenet", spec, cfg), backend.build_model("lenet", spec, cfg)
    assert {k: v.shape for k, v in backend.get_weights(model).items()} == canonical_shapes("lenet", spec, cfg)
    backend.set_weights(model, reference.get_weights(numpy_model))
    x = np.random.default_rng(3).random((6, *spec.input_shape), dtype=np.float32)
    np.testing.assert_allclose(backend.predict(model, x), reference.predict(numpy_model, x), rtol=1e-4, atol=1e-5)


# -- training -------------------------------------------------------------------------------


def test_training_lowers_loss_on_digits(backend: MlxBackend, config: dict, digits) -> None:
    x, y = digits
    model = backend.build_model("mlp", GREY, config)
    before = backend.evaluate(model, x, y, config)
    metrics = backend.train(model, x, y, {**config, "local-epochs": 5, "batch-size": 32, "server-round": 1})
    after = backend.evaluate(model, x, y, config)
    assert after["loss"] < before["loss"] - 0.5 and after["accuracy"] > before["accuracy"] + 0.3
    types = {key: type(value) for key, value in metrics.items()}
    assert types == {"loss": float, "accuracy": float, "num-examples": int}


def test_fedprox_term_keeps_weights_near_the_global_ones(backend: MlxBackend, config: dict, digits) -> None:
    x, y = digits
    drift = {}
    for mu in (0.0, 10.0):
        model = backend.build_model("mlp", GREY, config)
        start = backend.get_weights(model)
        backend.train(model, x, y, {**config, "batch-size": 32, "server-round": 1, "proximal-mu": mu})
        drift[mu] = sum(float(np.sum((w - start[k]) ** 2)) for k, w in backend.get_weights(model).items())
    assert 0 < drift[10.0] < 0.5 * drift[0.0]


def test_shuffling_follows_seed_and_server_round(backend: MlxBackend, config: dict, digits) -> None:
    x, y = digits
    trained = {}
    for server_round in (1, 1, 2):
        model = backend.build_model("mlp", GREY, config)
        backend.train(model, x, y, {**config, "batch-size": 64, "server-round": server_round})
        trained.setdefault(server_round, []).append(backend.get_weights(model)["layers.0.weight"])
    np.testing.assert_array_equal(trained[1][0], trained[1][1])
    assert not np.array_equal(trained[1][0], trained[2][0]), "another round must shuffle differently"


# -- native file format ---------------------------------------------------------------------


def test_saves_mlx_safetensors(backend: MlxBackend, config: dict, tmp_path: Path) -> None:
    import mlx.core as mx

    model = backend.build_model("lenet", COLOUR, config)
    path = tmp_path / "model.safetensors"
    backend.save(model, path)
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, JSON header, raw tensors
    header = json.loads(data[8 : 8 + header_size])
    tensors = {key: value for key, value in header.items() if key != "__metadata__"}
    assert list(tensors) == sorted(canonical_shapes("lenet", COLOUR, config))
    assert {value["dtype"] for value in tensors.values()} == {"F32"}
    assert tensors["layers.0.weight"]["shape"] == [6, 5, 5, 3], "MLX's own channels-last layout"
    loaded = mx.load(str(path))
    for key, value in backend.get_weights(backend.load(backend.build_model("lenet", COLOUR, config), path)).items():
        np.testing.assert_array_equal(value, backend.get_weights(model)[key])
        assert loaded[key].shape == tuple(tensors[key]["shape"])


# -- platforms where MLX cannot run -----------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "machine", "says"),
    [
        ("Windows", "AMD64", "not on Windows"),
        ("Darwin", "x86_64", "Apple silicon"),
    ],
)
def test_unsupported_platform_is_one_line(
    backend: MlxBackend, monkeypatch: pytest.MonkeyPatch, system: str, machine: str, says: str
) -> None:
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    with pytest.raises(BackendUnavailable, match=says) as error:
        backend.check_available()
    assert "\n" not in str(error.value) and "fedplug list" in str(error.value)


def test_mlx_without_compute_library_is_reported_by_fedplug_run(tmp_path: Path) -> None:
    # The `mlx` wheel alone on Linux: bindings whose import fails for want of libmlx.so.
    fake = tmp_path / "site" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "core.py").write_text("raise ImportError('libmlx.so: cannot open shared object file')\n")
    proc = fedplug("run", "mlx", "--out", str(tmp_path / "run"), env={"PYTHONPATH": str(fake.parent)})
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "mlx" in line and "cannot run here" in line]
    assert len(lines) == 1, proc.stderr
    assert "without its compute library" in lines[0] and "pip install 'mlx[cpu]'" in lines[0]
    assert not (tmp_path / "run" / "config.json").exists()


# -- end to end ------------------------------------------------------------------------------


def test_fedplug_run_mlx_learns(run_fedplug) -> None:
    args = ("--rounds", "2", "--nodes", "4", "--fraction-train", "0.5")
    _, out = run_fedplug("mlx", *args)
    rounds = check_results(out, ".safetensors")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"] + 0.1
    assert rounds[-1]["evaluate-accuracy"] > rounds[1]["evaluate-accuracy"]
    assert_killed_run_resumes_bit_identical("mlx", out, args, "model.safetensors")


def test_killed_fedadam_run_resumes_bit_identical(run_fedplug) -> None:
    """SIGKILL after round 1 of 3, resumed: bit-identical to the uninterrupted run, with the server optimiser's
    state and seeded sampling of half the nodes (the quickstart run above covers FedAvg)."""
    args = ("--rounds", "3", "--nodes", "4", "--fraction-train", "0.5", "--model", "mlp", "--strategy", "fedadam",
            "--run-config", "hidden-dims='16'")  # fmt: skip
    _, out = run_fedplug("mlx", *args)
    assert_killed_run_resumes_bit_identical("mlx", out, args, "model.safetensors")


class TestConformance(BackendConformance):
    backend_name = "mlx"
