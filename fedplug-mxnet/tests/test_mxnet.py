"""Tests of fedplug-mxnet; they run only in a virtual environment of their own (numpy < 2).

See tests/run-all.sh: ``pip install ./fedplug-core ./fedplug-mxnet pytest`` into a fresh
venv, then ``python -m pytest fedplug-mxnet/tests``.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from fedplug import BackendUnavailable, DataSpec
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.plan import with_preset
from fedplug.testing import BackendConformance
from fedplug.testing.runs import assert_killed_run_resumes_bit_identical, check_results, fedplug
from fedplug.toolkit import canonical_shapes
from fedplug_mxnet import MXNetBackend, framework

NUMPY_1 = (("numpy", "numpy<2"),)
"""MXNet 1.9.1's numpy requirement, checked with the framework's."""
GREY, COLOUR = DataSpec((1, 28, 28), 10), DataSpec((3, 32, 32), 3)
CONFIG = {"seed": 7, "hidden-dims": "32,16", "pool": "max", "lr": 0.1, "batch-size": 16, "local-epochs": 1}


@pytest.fixture(scope="module")
def backend() -> MXNetBackend:
    return MXNetBackend()


def python(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of this environment."""
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120)


def batch(spec: DataSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *spec.input_shape), dtype=np.float32), rng.integers(0, spec.num_classes, n)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """512 real MNIST digits from fedplug-core's embedded set, as the backend receives them."""
    with resources.files("fedplug.data").joinpath("mnist.npz").open("rb") as file, np.load(file) as npz:
        images, labels = npz["train_images"][:512], npz["train_labels"][:512]
    return (images[:, None] / np.float32(255)).astype(np.float32), labels.astype(np.int64)


class TestConformance(BackendConformance):
    backend_name = "mxnet"


# contract: the quickstart's values -------------------------------------------------


def test_quickstart_preset_reproduces_quickstart_mxnet(backend: MXNetBackend) -> None:
    """--preset quickstart is exactly the Flower quickstart's settings (fedplug 0.1's defaults)."""
    config = resolve(backend, with_preset(backend, "quickstart", {}))
    # Dense 256 relu -> Dense 64 relu -> Dense 10; the second Trainer (lr 0.01) wins
    assert config["model"] == "mlp" and config["hidden-dims"] == "256,64"
    assert config["lr"] == 0.01 and config["batch-size"] == 100 and config["local-epochs"] == 2
    assert config["num-server-rounds"] == 3 and config["num-supernodes"] == 2
    assert config["fraction-train"] == 1.0 and config["fraction-evaluate"] == 1.0
    assert config["strategy"] == "fedavg"
    assert backend.quickstart_dataset == "ylecun/mnist"
    assert backend.models == ("mlp", "lenet") and backend.file_suffix == ".params"
    framework = backend.framework
    assert (framework.import_name, framework.requirement, framework.also) == ("mxnet", "mxnet==1.9.1", NUMPY_1)


def test_notice_says_retired_and_points_to_maintained_backends(backend: MXNetBackend) -> None:
    assert "\n" not in backend.notice
    for word in ("retired", "Attic", "1.9.1", "fedplug-torch", "fedplug-jax", "fedplug-keras", "fedplug-mlx"):
        assert word in backend.notice


# the numpy compatibility step -------------------------------------------------------


def test_mxnet_import_fails_without_the_aliases_and_works_with_them() -> None:
    bare = python("import mxnet")
    assert bare.returncode != 0 and "has no attribute 'bool'" in bare.stderr
    shimmed = python(
        "import numpy as np\n"
        "from fedplug_mxnet import framework\n"
        "before = dict(vars(np))\n"
        "assert framework.restore_numpy_aliases() == ['bool', 'int']\n"
        "added = {k for k in vars(np) if k not in before}\n"
        "assert added == {'bool', 'int'}, added\n"
        "assert all(vars(np)[k] is before[k] for k in before), 'numpy attribute changed'\n"
        "assert np.bool is bool and np.int is int\n"
        "import mxnet\n"
        "print(mxnet.__version__)"
    )
    assert shimmed.returncode == 0, shimmed.stderr
    assert shimmed.stdout.strip() == "1.9.1"


@pytest.mark.filterwarnings("ignore:In the future `np.bool`:FutureWarning")
def test_aliases_restored_only_where_numpy_lacks_them(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = object()
    monkeypatch.setattr(np, "int", sentinel, raising=False)
    monkeypatch.setattr(np, "bool", bool, raising=False)
    assert framework.restore_numpy_aliases() == []
    assert np.int is sentinel and np.bool is bool
    assert set(framework.MXNET_NUMPY_ALIASES) == {"bool", "int"}


def test_mxnet_imports_quietly_and_sizes_its_threads() -> None:
    """Even with every warning shown, importing mxnet and training print nothing."""
    code = (
        "import os\n"
        "os.environ.pop('OMP_NUM_THREADS', None)\n"
        "import numpy as np\n"
        "from fedplug import DataSpec\n"
        "from fedplug.toolkit import cpu_share\n"
        "from fedplug_mxnet import MXNetBackend\n"
        "expected = str(cpu_share())\n"
        "b = MXNetBackend()\n"
        "spec = DataSpec((1, 28, 28), 10)\n"
        "m = b.build_model('lenet', spec, {'seed': 0, 'pool': 'max'})\n"
        "x = np.zeros((8, 1, 28, 28), np.float32); y = np.zeros(8, np.int64)\n"
        "b.train(m, x, y, {'lr': 0.1, 'batch-size': 4, 'local-epochs': 1})\n"
        "b.evaluate(m, x, y, {})\n"
        "assert os.environ['OMP_NUM_THREADS'] == expected\n"
    )
    proc = python(code, "-W", "always")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_check_available_refuses_numpy_2_and_missing_mxnet(
    backend: MXNetBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.check_available()
    found = importlib.metadata.version
    monkeypatch.setattr("fedplug.backend.version", lambda name: "2.0.0" if name == "numpy" else found(name))
    with pytest.raises(
        BackendUnavailable, match=r'needs numpy<2, found numpy 2\.0\.0: pip install fedplug-mxnet "numpy<2"'
    ):
        backend.check_available()
    monkeypatch.undo()
    monkeypatch.setattr(backend, "framework", replace(backend.framework, import_name="no_such_mxnet"))
    with pytest.raises(BackendUnavailable, match=r'needs no_such_mxnet: pip install fedplug-mxnet "numpy<2"'):
        backend.check_available()


def test_plugin_module_does_not_import_mxnet() -> None:
    """Neither mxnet nor the numpy compatibility step is loaded with the plugin."""
    proc = python("import fedplug_mxnet, sys, numpy\nassert 'mxnet' not in sys.modules and 'int' not in vars(numpy)")
    assert proc.returncode == 0, proc.stderr


# weights --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_weights_round_trip_after_a_forward_pass(backend: MXNetBackend, model: str) -> None:
    """After a forward pass oneDNN keeps conv weights in its own layout; set/get still work exactly."""
    spec = DataSpec((1, 20, 24), 4)
    built = backend.build_model(model, spec, CONFIG)
    weights = backend.get_weights(built)
    assert {key: value.shape for key, value in weights.items()} == canonical_shapes(model, spec, CONFIG)
    backend.predict(built, batch(spec, 3)[0])
    changed = {key: value + 0.5 for key, value in weights.items()}
    backend.set_weights(built, changed)
    again = backend.get_weights(built)
    assert all(np.array_equal(again[key], changed[key]) for key in changed)


# training -------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "lr"), [("mlp", 0.1), ("lenet", 0.3)])
def test_training_lowers_loss_reuses_graph_and_takes_lr_each_call(
    backend: MXNetBackend, digits: tuple[np.ndarray, np.ndarray], model: str, lr: float
) -> None:
    x, y = digits
    config = {**CONFIG, "hidden-dims": "256,64", "lr": lr, "local-epochs": 3, "server-round": 1}
    built = backend.build_model(model, GREY, config)
    before = backend.evaluate(built, x, y, config)
    metrics = backend.train(built, x, y, config)
    graph = built.net._cached_op
    assert graph is not None  # hybridized: Gluon's compiled graph
    after = backend.evaluate(built, x, y, config)
    assert after["loss"] < before["loss"] - 0.1
    assert set(metrics) == {"loss", "accuracy", "num-examples"} and metrics["num-examples"] == len(y)
    assert type(metrics["loss"]) is float and type(metrics["accuracy"]) is float
    assert set(after) == {"loss", "accuracy", "num-examples"}
    assert [type(after[key]) for key in ("loss", "accuracy", "num-examples")] == [float, float, int]
    backend.train(built, x[:64], y[:64], {**config, "lr": 0.02, "server-round": 2})
    assert built.net._cached_op is graph


@pytest.mark.parametrize(("model", "mu"), [("mlp", 0.0), ("lenet", 0.0), ("mlp", 1.0)])
def test_training_is_the_numpy_backends_sgd(
    backend: MXNetBackend, digits: tuple[np.ndarray, np.ndarray], model: str, mu: float
) -> None:
    """Same start, shuffling and batches (and FedProx term): Gluon's SGD lands where the reference does."""
    x, y = digits
    config = {**CONFIG, "server-round": 4, "proximal-mu": mu}
    reference = NumpyBackend()
    numpy_model = reference.build_model(model, GREY, config)
    built = backend.build_model(model, GREY, config)
    backend.set_weights(built, reference.get_weights(numpy_model))
    ours, theirs = backend.train(built, x, y, config), reference.train(numpy_model, x, y, config)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["accuracy"] == theirs["accuracy"]
    expected = reference.get_weights(numpy_model)
    for key, value in backend.get_weights(built).items():
        np.testing.assert_allclose(value, expected[key], atol=1e-5, err_msg=key)


# native file ------------------------------------------------------------------------


def test_save_load_native_params_file(backend: MXNetBackend, tmp_path: Path) -> None:
    spec = COLOUR
    built = backend.build_model("lenet", spec, CONFIG)
    x, y = batch(spec, 16)
    backend.train(built, x, y, CONFIG)
    path = tmp_path / f"model{backend.file_suffix}"
    backend.save(built, path)
    assert path.read_bytes()[:8] == (0x112).to_bytes(8, "little")  # MXNet's NDArray-list magic
    import mxnet

    stored = mxnet.nd.load(str(path))
    # Gluon's structural names: child index in the HybridSequential (pools hold none)
    assert list(stored) == [f"{i}.{kind}" for i in (0, 2, 4, 5, 6) for kind in ("weight", "bias")]
    fresh = backend.load(backend.build_model("lenet", spec, {**CONFIG, "seed": 99}), path)
    np.testing.assert_array_equal(backend.predict(fresh, x), backend.predict(built, x))


# end to end -------------------------------------------------------------------------


def test_fedplug_run_mxnet_end_to_end(run_fedplug, tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    info = fedplug("info", "mxnet", env=env)
    assert info.returncode == 0 and "Attic" in info.stdout
    args = ("--rounds", "2", "--nodes", "2", "--run-config", "lr=0.1")
    proc, out = run_fedplug("mxnet", *args, env=env)
    assert "retired" in proc.stderr  # the notice, on the first run
    rounds = check_results(out, ".params")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["centralized-accuracy"] > rounds[1]["centralized-accuracy"] > rounds[0]["centralized-accuracy"]
    assert rounds[2]["centralized-accuracy"] > rounds[0]["centralized-accuracy"] + 0.3
    assert rounds[2]["evaluate-accuracy"] > 0.6
    assert_killed_run_resumes_bit_identical("mxnet", out, args, "model.params", env=env)


def test_killed_fedadam_run_resumes_bit_identical(run_fedplug, tmp_path: Path) -> None:
    """SIGKILL after round 1 of 3, resumed: bit-identical to the uninterrupted run, with the server optimiser's
    state and seeded sampling of half the nodes (the quickstart run above covers FedAvg)."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    args = ("--rounds", "3", "--nodes", "4", "--fraction-train", "0.5", "--model", "mlp", "--strategy", "fedadam",
            "--run-config", "hidden-dims='16'")  # fmt: skip
    _, out = run_fedplug("mxnet", *args, env=env)
    assert_killed_run_resumes_bit_identical("mxnet", out, args, "model.params", env=env)


def test_the_default_run_learns(run_fedplug, tmp_path: Path) -> None:
    """`fedplug run mxnet` with no options learns on the embedded digits (docs/performance.md: the benchmark
    holds the 85% target; this test a softer floor)."""
    _, out = run_fedplug("mxnet", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    rounds = check_results(out, ".params")
    assert rounds[-1]["centralized-accuracy"] >= 0.8, [r.get("centralized-accuracy") for r in rounds]
