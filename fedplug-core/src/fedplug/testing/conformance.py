"""The checks of the conformance suite, as a pytest base class."""

from __future__ import annotations

import pickle
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fedplug.backend import Backend, DataSpec
from fedplug.config import CORE_DEFAULTS, defaults_for, resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.plugins import DEFAULT_PLUGINS, ENTRY_POINT_GROUP, get_registry

SPECS = (
    DataSpec((1, 28, 28), 10),
    DataSpec((3, 32, 32), 10),
    DataSpec((1, 28, 28), 3),
    DataSpec((3, 32, 32), 3),
)
"""Grey and colour images of two sizes, 10 and 3 classes."""
HEAVY_FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "mlx", "mxnet")
SHARED_MODELS = ("mlp", "lenet")


def _batch(spec: DataSpec, n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small fixed batch: per-class mean images plus noise, so a few steps can fit it."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % spec.num_classes
    prototypes = rng.uniform(0, 1, (spec.num_classes, *spec.input_shape))
    x = np.clip(prototypes[y] + rng.normal(0, 0.1, (n, *spec.input_shape)), 0, 1)
    return x.astype(np.float32), y.astype(np.int64)


class BackendConformance:
    """Subclass with ``backend_name = "..."``; pytest runs every ``test_*`` check."""

    backend_name: ClassVar[str]
    determinism_atol: ClassVar[float] = 0.0
    """0 demands bit-identical weights for the same seed; a backend whose framework
    cannot be deterministic on CPU sets a tolerance and documents why."""
    prediction_atol: ClassVar[float] = 1e-4
    """Agreement with the NumPy reference backend's logits for the same weights."""

    # -- fixtures -------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def backend(cls) -> Backend:
        registry = get_registry()
        assert cls.backend_name in registry.backends, (
            f"backend '{cls.backend_name}' is not registered: install its distribution "
            f"(pip install -e .) and register it from a '{ENTRY_POINT_GROUP}' entry point; "
            f"broken plugins: {[(b.plugin, b.reason) for b in registry.broken]}"
        )
        backend = registry.backends[cls.backend_name].backend
        backend.check_available()
        return backend

    @pytest.fixture(scope="class")
    @classmethod
    def config(cls, backend: Backend) -> dict[str, Any]:
        return resolve(backend, {})

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls) -> NumpyBackend:
        return NumpyBackend()

    def _config(self, backend: Backend, **overrides: Any) -> dict[str, Any]:
        return resolve(backend, overrides)

    # -- registration and packaging ------------------------------------------------------

    def test_registered_through_entry_point(self, backend: Backend) -> None:
        registry = get_registry()
        entry = registry.backends[self.backend_name]
        assert entry.distribution != "?" and entry.version != "?", (
            "the backend's plugin is not in an installed distribution: add "
            f"[project.entry-points.{ENTRY_POINT_GROUP}] to pyproject.toml and pip install it"
        )
        names = {point.name for point in entry_points(group=ENTRY_POINT_GROUP)}
        assert entry.plugin in names or entry.plugin in DEFAULT_PLUGINS, (
            f"plugin '{entry.plugin}' is not a '{ENTRY_POINT_GROUP}' entry point of {entry.distribution}"
        )
        problems = [broken.reason for broken in registry.broken if broken.plugin == entry.plugin]
        assert not problems, (
            f"plugin '{entry.plugin}' ({entry.distribution}) also registered something fedplug rejected: "
            f"{'; '.join(problems)}; fix or remove that registration"
        )

    def test_plugin_import_is_light(self, backend: Backend) -> None:
        module = type(backend).__module__
        heavy = sorted({*HEAVY_FRAMEWORKS, backend.framework.import_name} - {"numpy"})
        code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"importing {module} fails: {done.stderr.strip()[-500:]}"
        imported = done.stdout.strip()
        assert not imported, (
            f"importing {module} imports {imported}: import the framework inside the backend's "
            "methods, not at module level, so `fedplug list` stays fast"
        )

    def test_default_config_complete_and_typed(self, backend: Backend, config: dict[str, Any]) -> None:
        for key, value in backend.defaults.items():
            assert isinstance(value, bool | int | float | str), f"default '{key}' must be a scalar, got {value!r}"
            if key in CORE_DEFAULTS:
                expected = type(CORE_DEFAULTS[key])
                assert type(value) is expected, (
                    f"default '{key}' must be {expected.__name__} like the core's {CORE_DEFAULTS[key]!r}, got {value!r}"
                )
        assert set(defaults_for(backend)) == set(config), "resolve() must keep exactly the default keys"
        assert config["model"] in backend.models, f"default model '{config['model']}' is not in models {backend.models}"
        assert isinstance(backend.quickstart_dataset, str) and backend.quickstart_dataset, (
            "set quickstart_dataset to the Hugging Face id of the quickstart's dataset"
        )
        assert backend.file_suffix.startswith("."), "file_suffix must look like '.pt'"

    # -- models and canonical layout ---------------------------------------------------

    @pytest.mark.parametrize("spec", SPECS, ids=str)
    def test_models_build_for_data_specs(self, backend: Backend, config: dict[str, Any], spec: DataSpec) -> None:
        x, _ = _batch(spec, n=4)
        for name in backend.models:
            model = backend.build_model(name, spec, config)
            scores = np.asarray(backend.predict(model, x))
            assert scores.shape == (4, spec.num_classes), (
                f"model '{name}' for {spec} predicts shape {scores.shape}, expected (4, {spec.num_classes})"
            )

    @pytest.mark.parametrize("model_name", SHARED_MODELS)
    @pytest.mark.parametrize("spec", SPECS[:2], ids=str)
    def test_canonical_layout(
        self, backend: Backend, reference: NumpyBackend, config: dict[str, Any], model_name: str, spec: DataSpec
    ) -> None:
        expected = reference.get_weights(reference.build_model(model_name, spec, config))
        got = backend.get_weights(backend.build_model(model_name, spec, config))
        assert list(got) == list(expected), (
            f"'{model_name}' weights must be named and ordered {list(expected)}, got {list(got)}"
        )
        for key, array in got.items():
            assert isinstance(array, np.ndarray), f"{key} must be a numpy array, got {type(array).__name__}"
            assert array.shape == expected[key].shape, (
                f"{key} of '{model_name}' must have canonical shape {expected[key].shape} (dense (out, in), "
                f"conv (out, in, kh, kw)), got {array.shape}"
            )
            assert array.dtype == expected[key].dtype, f"{key} must be {expected[key].dtype}, got {array.dtype}"

    @pytest.mark.parametrize("model_name", SHARED_MODELS)
    def test_weights_round_trip_exactly(self, backend: Backend, config: dict[str, Any], model_name: str) -> None:
        model = backend.build_model(model_name, SPECS[1], config)
        rng = np.random.default_rng(1)
        sent = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in backend.get_weights(model).items()}
        backend.set_weights(model, sent)
        back = backend.get_weights(model)
        for key, array in sent.items():
            np.testing.assert_array_equal(back[key], array, err_msg=f"get(set({key})) changed the values")

    @pytest.mark.parametrize(("model_name", "pool"), [("mlp", "max"), ("lenet", "max"), ("lenet", "avg")])
    @pytest.mark.parametrize("spec", SPECS[1:3], ids=str)
    def test_same_predictions_as_numpy_reference(
        self, backend: Backend, reference: NumpyBackend, model_name: str, pool: str, spec: DataSpec
    ) -> None:
        config = self._config(backend, pool=pool)
        numpy_model = reference.build_model(model_name, spec, config)
        model = backend.build_model(model_name, spec, config)
        try:
            backend.set_weights(model, reference.get_weights(numpy_model))
        except Exception as error:
            pytest.fail(
                f"set_weights() refused the reference's canonical '{model_name}' weights: "
                f"{type(error).__name__}: {error}; convert from the canonical layout at set_weights"
            )
        x, _ = _batch(spec, n=8)
        np.testing.assert_allclose(
            np.asarray(backend.predict(model, x)),
            reference.predict(numpy_model, x),
            rtol=1e-3,
            atol=self.prediction_atol,
            err_msg=f"'{model_name}' (pool {pool}) with the reference weights predicts differently: check the "
            "layout conversion at get/set and that flattening follows channels-first (C, H, W) order",
        )

    # -- training and evaluation -------------------------------------------------------

    def test_training_lowers_loss(self, backend: Backend, config: dict[str, Any]) -> None:
        spec = SPECS[0]
        x, y = _batch(spec)
        cfg = {**config, "local-epochs": 5, "batch-size": 16, "server-round": 1}
        model = backend.build_model(str(config["model"]), spec, cfg)
        before = backend.evaluate(model, x, y, cfg)["loss"]
        metrics = backend.train(model, x, y, cfg)
        after = backend.evaluate(model, x, y, cfg)["loss"]
        assert after < before, f"5 local epochs on a fixed batch did not lower the loss ({before:.4f} -> {after:.4f})"
        assert isinstance(metrics.get("loss"), float), f"train must return a float 'loss', got {metrics!r}"
        assert metrics.get("num-examples") == len(y) and type(metrics["num-examples"]) is int, (
            f"train must return 'num-examples' = {len(y)} as an int, got {metrics.get('num-examples')!r}"
        )

    def test_evaluate_returns_standard_metrics(self, backend: Backend, config: dict[str, Any]) -> None:
        spec = SPECS[0]
        x, y = _batch(spec, n=20)
        metrics = backend.evaluate(backend.build_model(str(config["model"]), spec, config), x, y, config)
        for key in ("loss", "accuracy"):
            assert type(metrics.get(key)) is float, f"evaluate must return '{key}' as a Python float, got {metrics!r}"
        assert 0.0 <= metrics["accuracy"] <= 1.0, f"accuracy must be a fraction in [0, 1], got {metrics['accuracy']}"
        assert metrics.get("num-examples") == len(y) and type(metrics["num-examples"]) is int, (
            f"evaluate must return 'num-examples' = {len(y)} as an int, got {metrics.get('num-examples')!r}"
        )

    def test_same_seed_same_weights(self, backend: Backend, config: dict[str, Any]) -> None:
        spec = SPECS[0]
        x, y = _batch(spec, n=32)
        cfg = {**config, "local-epochs": 1, "batch-size": 8, "server-round": 1}
        runs = []
        for _ in range(2):
            model = backend.build_model(str(config["model"]), spec, cfg)
            backend.train(model, x, y, cfg)
            runs.append(backend.get_weights(model))
        for key in runs[0]:
            np.testing.assert_allclose(
                runs[1][key],
                runs[0][key],
                rtol=0,
                atol=self.determinism_atol,
                err_msg=f"{key} differs between two runs with seed {cfg['seed']}: seed the model init and the "
                "shuffling from config['seed'] (and config['server-round'])",
            )

    # -- native save format ----------------------------------------------------------------

    def test_save_load_gives_identical_predictions(
        self, backend: Backend, config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        spec = SPECS[1]
        x, y = _batch(spec, n=16)
        model = backend.build_model(str(config["model"]), spec, config)
        backend.train(model, x, y, {**config, "server-round": 1})
        path = tmp_path / f"model{backend.file_suffix}"
        backend.save(model, path)
        assert path.is_file() and path.stat().st_size > 0, f"save() wrote nothing at {path}"
        other = backend.build_model(str(config["model"]), spec, {**config, "seed": int(config["seed"]) + 1})

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("load() used pickle: read the native format without unsafe deserialization")

        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(pickle, name, refuse)
        loaded = backend.load(other, path)
        monkeypatch.undo()
        np.testing.assert_allclose(
            np.asarray(backend.predict(loaded, x)),
            np.asarray(backend.predict(model, x)),
            rtol=0,
            atol=1e-6,
            err_msg="the loaded model predicts differently from the saved one",
        )

    # -- Flower ClientApp ------------------------------------------------------------------

    def test_client_app_handles_train_and_evaluate_messages(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        from fedplug.apps import client_app, from_record, to_record
        from fedplug.data import data_spec

        config = self._config(backend, **{"num-supernodes": 20, "local-epochs": 1})
        model = backend.build_model(str(config["model"]), data_spec(config), config)
        sent = backend.get_weights(model)
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"partition-id": 0, "num-partitions": 20},
            state=RecordDict(),
            run_config=config,
        )
        for key in ("_task_id", "_run_id", "_node_id"):  # what a Flower runtime sets in its process
            monkeypatch.setattr(TaskIdentity, key, 1)
        replies = {}
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            content = RecordDict(
                {"arrays": to_record(sent), "config": ConfigRecord({"lr": config["lr"], "server-round": 1})}
            )
            try:
                replies[kind] = client_app(Message(content=content, dst_node_id=1, message_type=kind), context)
            except Exception as error:
                pytest.fail(
                    f"the ClientApp failed on a {kind} message: {type(error).__name__}: {error}; "
                    "train/evaluate must return Python int/float metrics and take canonical weights"
                )
        for kind, reply in replies.items():
            assert not reply.has_error(), f"the ClientApp failed on a {kind} message: {reply.error}"
            metrics = reply.content["metrics"]
            assert int(metrics["num-examples"]) > 0, f"{kind} reply lacks a positive num-examples"
        trained = from_record(replies[MessageType.TRAIN].content["arrays"])
        assert list(trained) == list(sent), "the train reply must carry the canonical weights, same names and order"
        assert any(not np.array_equal(trained[k], sent[k]) for k in sent), "training did not change the weights"
        assert {"loss", "accuracy"} <= set(replies[MessageType.EVALUATE].content["metrics"]), (
            "the evaluate reply must carry 'loss' and 'accuracy'"
        )
