"""The checks of the conformance suite, as pytest base classes, in two tiers.

``BasicConformance`` is the basic tier: a backend that works alone (registration, light
import, defaults, building, training, determinism, the optimiser keys, saving, the Flower
ClientApp). ``BackendConformance`` adds the mixable tier: a backend whose nodes can join a
federation of other frameworks' (the canonical layout, the reference's predictions and
training). A backend declares its tier with ``conformance = "basic"`` or ``"mixable"``.

Checks marked "every model" run once per model the backend declares in ``models``
(pytest parametrizes them with ``declared_model`` at collection), but ``lenet-bn``, which
the checks of ``lenet`` check too where it is declared (``with_declared_bn``). Each check's
docstring says what it guards and how to fix a failure.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from fedplug.backend import OPERATIONS, Backend, DataSpec, Scalar, Weights, require_available
from fedplug.config import CORE_DEFAULTS, check_supported, defaults_for, resolve
from fedplug.display import TIERS, named_prefix
from fedplug.errors import ConfigError
from fedplug.numpy_backend import NumpyBackend
from fedplug.plugins import DEFAULT_PLUGINS, ENTRY_POINT_GROUP, get_registry
from fedplug.testing.rebuilds import Probe, framework_probes, probe_state, tells
from fedplug.testing.reference import (
    OPTIMISER_CASES,
    STEPS,
    Models,
    declared_case,
    reference_gap,
    spec_for,
    training_batch,
)

SPECS = (
    DataSpec((1, 28, 28), 10),
    DataSpec((3, 32, 32), 10),
    DataSpec((1, 28, 28), 3),
    DataSpec((3, 32, 32), 3),
)
"""Grey and colour images of two sizes, 10 and 3 classes."""
ODD_SPEC = DataSpec((3, 29, 31), 3)
"""Odd height and width, odd again after each LeNet conv: pooling must drop the last row/column."""
HEAVY_FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "flax", "mlx", "mxnet")
SHARED_MODELS = ("mlp", "lenet")
"""The shared models every backend builds; ``lenet-bn`` is checked with ``lenet`` where a backend declares it."""


def with_declared_bn(backend: Backend, model_name: str) -> list[str]:
    """``model_name``, and ``lenet-bn`` after ``lenet`` where the backend declares it (in the same check, so the
    suite's run time grows by the models built, not by new checks)."""
    return [model_name, "lenet-bn"] if model_name == "lenet" and "lenet-bn" in backend.models else [model_name]


SAFE_FORMATS = "safetensors, Flax msgpack or numpy .npz (np.savez / np.load(allow_pickle=False))"
ODD_POOLING = (
    "2x2 pooling must drop an odd last row/column (floor: no padding, no ceil mode), so that a 29x31 image "
    "gives 25x27 -> 12x13 -> 8x9 -> 4x4 feature maps, as fedplug.models.canonical_shapes assumes"
)
ADAM_HINT = (
    "for adam, epsilon goes after the bias correction: w -= lr / (1 - 0.9^t) * m / (sqrt(v) / sqrt(1 - 0.999^t) "
    "+ 1e-8), t counting this call's steps from 1 (torch.optim.Adam); Keras's and MXNet's own Adam add epsilon "
    "before it, so pass them epsilon * sqrt(1 - 0.999^t) or write the update yourself"
)
OPTIMISER_KEYS: dict[str, dict[str, Scalar]] = {
    "momentum": {"optimizer": "sgd", "momentum": 0.9},
    "weight-decay": {"weight-decay": 0.05},
    "proximal-mu": {"proximal-mu": 1.0},
    "optimizer=adam": {"optimizer": "adam"},
}
"""Each optimiser key (or value) of the contract, and a ``train`` config that uses it."""


def _batch(spec: DataSpec, n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small fixed batch: per-class mean images plus noise, so a few steps can fit it."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % spec.num_classes
    prototypes = rng.uniform(0, 1, (spec.num_classes, *spec.input_shape))
    x = np.clip(prototypes[y] + rng.normal(0, 0.1, (n, *spec.input_shape)), 0, 1)
    return x.astype(np.float32), y.astype(np.int64)


def _differ(a: Weights, b: Weights) -> bool:
    return any(not np.array_equal(a[key], b[key]) for key in a)


def _drift(weights: Weights, start: Weights) -> float:
    return sum(float(np.sum((np.asarray(value, np.float64) - start[key]) ** 2)) for key, value in weights.items())


def follows_0_1_contract(backend: Backend) -> bool:
    """Whether the backend defines the operations on its descriptor (fedplug 0.1's contract, until 0.3)."""
    subclasses = type(backend).__mro__[: type(backend).__mro__.index(Backend)]  # Backend itself forwards them
    return any(all(name in vars(cls) for name in OPERATIONS) for cls in subclasses)


def default_config(backend: Backend) -> dict[str, Any]:
    """The backend's resolved default run config; a refusal fails the check with what to do instead."""
    require_available(backend, defaults_for(backend))
    try:
        return resolve(backend, {})
    except ConfigError as error:
        pytest.fail(
            f"fedplug run {backend.name} refuses the backend's own default run config here ({error}) although "
            "check_available() passes, so `fedplug list` says it is available where `fedplug run` refuses: test "
            "what this machine lacks (a device, a compiler, a library) in check_available(config), raising "
            "fedplug.BackendUnavailable, and keep check_config for the values of the backend's own keys",
            pytrace=False,
        )


def _pickle_functions() -> dict[int, str]:
    """id -> name of every pickle entry point a loader may reach, also under other names."""
    import _pickle

    found = {}
    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
            if (function := getattr(module, name, None)) is not None:
                found[id(function)] = f"{module.__name__}.{name}"
    return found


_UNPICKLING: list[str] = []
"""While the save/load check loads, the audit hook records every class pickle looks up here."""
_AUDITING: list[bool] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class" and _AUDITING and _AUDITING[-1]:
        _UNPICKLING.append(".".join(str(arg) for arg in args))


def guard_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way to unpickle fail the check: pickle's functions under any name bound in any loaded
    module (``from pickle import loads``), and, through an audit hook, any unpickling that looks up a class."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(
            f"load() used pickle: read the native format without unsafe deserialization: use {SAFE_FORMATS}"
        )

    functions = _pickle_functions()
    for name in ("load", "loads", "Unpickler", "_load", "_loads", "_Unpickler"):
        if hasattr(pickle, name):
            monkeypatch.setattr(pickle, name, refuse)
    for module in list(sys.modules.values()):
        if module is pickle or module is None:
            continue
        try:
            bound = [name for name, value in vars(module).items() if id(value) in functions]
        except Exception:  # a module without a __dict__, or a lazy module that loads on access
            continue
        for name in bound:
            monkeypatch.setattr(module, name, refuse)
    if not _AUDITING:
        sys.addaudithook(_audit)  # audit hooks stay for the process: it records only while a check loads
        _AUDITING.append(False)
    _AUDITING.append(True)
    _UNPICKLING.clear()


def pickle_used() -> list[str]:
    """End ``guard_pickle``'s audit and return the classes pickle looked up meanwhile."""
    if len(_AUDITING) > 1:
        _AUDITING.pop()
    return list(_UNPICKLING)


class BasicConformance:
    """The basic tier: the backend works alone. Subclass with ``backend_name = "..."``; pytest runs every check."""

    backend_name: ClassVar[str]
    tier: ClassVar[str] = "basic"
    """The tier these checks establish: the backend must declare it as its ``conformance``."""
    determinism_atol: ClassVar[float] = 0.0
    """0 demands bit-identical weights for the same seed; a backend whose framework
    cannot be deterministic on CPU sets a tolerance and documents why."""
    prediction_atol: ClassVar[float] = 1e-4
    """Agreement with the NumPy reference backend's logits for the same weights: ``|logits - reference|
    <= prediction_atol + 1e-3 * |reference|``. Measured: every bundled backend within 1.4e-6."""
    training_atol: ClassVar[float] = 1e-5
    """Agreement with the NumPy reference backend's weights after one ``train`` call from the same start
    (max absolute difference; weights are of order 0.1 to 1). Measured: every bundled backend within
    2.3e-7 (float32 rounding). Other semantics fail it (torch, measured): Nesterov 2e-2, dampening 0.1
    5e-3, decoupled weight decay (AdamW) 8e-3, Adam with Keras's epsilon 1e-7 1.5e-5 (mlp) and 3e-3 (lenet)."""

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Run the checks that take ``declared_model`` once per model the backend declares."""
        if "declared_model" in metafunc.fixturenames:
            entry = get_registry().backends.get(self.backend_name)
            models = entry.backend.models if entry else SHARED_MODELS  # unregistered: the fixture says so
            # lenet-bn is lenet with batch normalisation: it is checked with lenet (with_declared_bn), in the
            # layout, round-trip and reference-training checks, where its train and eval modes must match
            metafunc.parametrize("declared_model", [model for model in models if model != "lenet-bn"])

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
        require_available(backend, defaults_for(backend))
        return backend

    @pytest.fixture(scope="class")
    @classmethod
    def config(cls, backend: Backend) -> dict[str, Any]:
        return default_config(backend)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls) -> NumpyBackend:
        return NumpyBackend()

    @pytest.fixture(scope="class")
    @classmethod
    def small_models(cls) -> Models:
        """Tiny models shared by the optimiser checks (built once: compiling is the slow part)."""
        return {}

    def _config(self, backend: Backend, **overrides: Any) -> dict[str, Any]:
        return resolve(backend, overrides)

    def rebuild_probes(self) -> list[Probe]:
        """Probes telling when the framework traced or compiled (``fedplug.testing.rebuilds``).

        Default: those of JAX, Keras on TensorFlow and MXNet. A backend of a kernel-compiling framework
        fedplug does not know adds its own: ``return [*super().rebuild_probes(), lambda model: len(cache)]``.
        """
        return framework_probes()

    def _trainer(
        self, backend: Backend, model_name: str, config: dict[str, Any], spec: DataSpec = SPECS[0], model: Any = None
    ) -> tuple[Weights, Callable[..., Weights]]:
        """Start weights and ``fit(x, y, target=None, **overrides)``: set them on one model, train, return weights."""
        model = backend.build_model(model_name, spec, config) if model is None else model
        start = backend.get_weights(model)

        def fit(x: np.ndarray, y: np.ndarray, target: Any = None, **overrides: Any) -> Weights:
            net = model if target is None else target
            backend.set_weights(net, start)
            backend.train(net, x, y, {**config, **overrides})
            return backend.get_weights(net)

        return start, fit

    # -- registration and packaging ------------------------------------------------------

    def test_registered_through_entry_point(self, backend: Backend) -> None:
        """The backend comes from an installed distribution's entry point, and nothing else it registers is broken.

        Fix: add ``[project.entry-points.fedplug]`` to pyproject.toml and ``pip install`` the project;
        register backend instances (not classes) with well-formed attributes.
        """
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
        """Importing the plugin module imports no ML framework, so ``fedplug list`` stays fast.

        Fix: keep the descriptor module free of framework imports; import the framework in the
        implementation module (named by ``implementation``), which fedplug imports on first use.
        """
        module = type(backend).__module__
        heavy = sorted({*HEAVY_FRAMEWORKS, backend.framework.import_name} - {"numpy"})
        code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"importing {module} fails: {done.stderr.strip()[-500:]}"
        imported = done.stdout.strip()
        assert not imported, (
            f"importing {module} imports {imported}: import the framework only in the implementation module "
            f"(implementation = '{backend.implementation or 'module:Class'}'), which fedplug imports on first use, "
            "and put imports made for type annotations under `if TYPE_CHECKING:`, so `fedplug list` stays fast"
        )

    def test_default_config_complete_and_typed(self, backend: Backend, config: dict[str, Any]) -> None:
        """The defaults are scalars of the core's types, the default model exists, the attributes are well formed,
        and the default run config runs wherever ``check_available`` passes.

        Fix: give ``defaults`` values of the same type as ``fedplug.config.CORE_DEFAULTS`` (``0.1`` not
        ``"0.1"``), make ``unsupported`` a frozenset of run-config keys, ``file_suffix`` like ``.pt``,
        ``description`` one line without the backend's name in front (fedplug shows ``name: description``),
        ``conformance`` the tier the backend's tests run (``"basic"``: ``BasicConformance``, ``"mixable"``:
        ``BackendConformance``); test what the machine lacks in ``check_available(config)``, not ``check_config``.
        """
        for key, value in backend.defaults.items():
            assert isinstance(value, bool | int | float | str), f"default '{key}' must be a scalar, got {value!r}"
            if key in CORE_DEFAULTS:
                expected = type(CORE_DEFAULTS[key])
                assert type(value) is expected, (
                    f"default '{key}' must be {expected.__name__} like the core's {CORE_DEFAULTS[key]!r}, got {value!r}"
                )
        assert set(defaults_for(backend)) == set(config), "resolve() must keep exactly the default keys"
        assert config["model"] in backend.models, f"default model '{config['model']}' is not in models {backend.models}"
        dataset = backend.quickstart_dataset
        assert dataset is None or (isinstance(dataset, str) and dataset), (
            "quickstart_dataset must be None (no Flower quickstart) or a Hugging Face dataset id"
        )
        assert isinstance(backend.unsupported, frozenset) and all(isinstance(k, str) for k in backend.unsupported), (
            f"unsupported must be a frozenset of run-config keys like frozenset({{'proximal-mu'}}), "
            f"got {backend.unsupported!r}"
        )
        foreign = sorted(key for key in backend.defaults if key not in CORE_DEFAULTS and "." not in key)
        assert not foreign, (
            f"default keys {foreign} are not the core's: put the backend's own keys in its namespace, "
            f"'{backend.name}.<key>' (like 'keras.backend')"
        )
        for entry in backend.unsupported:
            key = entry.partition("=")[0]
            assert key in config or key == "proximal-mu", (
                f"unsupported entry '{entry}' names no run-config key: use keys like 'momentum', 'weight-decay', "
                "'proximal-mu' or a value like 'optimizer=adam'"
            )
        assert backend.file_suffix.startswith("."), "file_suffix must look like '.pt'"
        description = backend.description
        assert "\n" not in description.strip(), "description must be one line: fedplug list shows it in a table row"
        if not follows_0_1_contract(backend):  # fedplug 0.1's new-backend wrote 'name: ...'; fedplug shows it once
            assert not named_prefix(description, backend.name), (
                f"description {description!r} starts with the backend's name: fedplug shows '{backend.name}: "
                "<description>', so drop the name from the description"
            )
        tier = backend.conformance
        assert tier in TIERS, (
            f"conformance = {tier!r} is not a tier: declare {' or '.join(map(repr, TIERS))} "
            f"({'; '.join(f'{name}: {what}' for name, what in TIERS.items())})"
        )
        assert tier == self.tier, (
            f"backend '{backend.name}' declares conformance = {tier!r} but its tests run the {self.tier} tier "
            f"({'BasicConformance' if self.tier == 'basic' else 'BackendConformance'}): "
            + (
                "subclass fedplug.testing.BackendConformance to check what mixing needs, or declare "
                "conformance = 'basic' (fedplug then keeps it out of mixed federations)"
                if tier == "mixable"
                else "declare conformance = 'mixable' if it passes these checks, or subclass "
                "fedplug.testing.BasicConformance"
            )
        )
        default_config(backend)  # says what to do if this machine refuses the defaults

    # -- models ----------------------------------------------------------------------------

    @pytest.mark.parametrize("spec", SPECS, ids=str)
    def test_models_build_for_data_specs(self, backend: Backend, config: dict[str, Any], spec: DataSpec) -> None:
        """Every declared model builds for grey and colour images and 10 or 3 classes, and predicts ``(N, classes)``.

        Fix: size the input and output layers from ``spec.input_shape`` and ``spec.num_classes``.
        """
        x, _ = _batch(spec, n=4)
        for name in backend.models:
            model = backend.build_model(name, spec, config)
            scores = np.asarray(backend.predict(model, x))
            assert scores.shape == (4, spec.num_classes), (
                f"model '{name}' for {spec} predicts shape {scores.shape}, expected (4, {spec.num_classes})"
            )

    @pytest.mark.parametrize("model_name", SHARED_MODELS)
    def test_weights_round_trip_exactly(self, backend: Backend, config: dict[str, Any], model_name: str) -> None:
        """``get_weights(set_weights(w)) == w`` bit for bit, so aggregation loses nothing.

        Fix: keep float32 end to end and make ``set_weights`` the exact inverse of ``get_weights``.
        """
        for name in with_declared_bn(backend, model_name):
            model = backend.build_model(name, SPECS[1], config)
            rng = np.random.default_rng(1)
            sent = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in backend.get_weights(model).items()}
            backend.set_weights(model, sent)
            back = backend.get_weights(model)
            for key, array in sent.items():
                np.testing.assert_array_equal(back[key], array, err_msg=f"{name}: get(set({key})) changed the values")

    # -- training and evaluation -------------------------------------------------------

    def test_training_lowers_loss(self, backend: Backend, config: dict[str, Any], declared_model: str) -> None:
        """Every model learns: 5 local epochs on a fixed batch lower its loss; ``train`` returns the standard metrics.

        Fix: train every declared model with ``config["lr"]`` for ``config["local-epochs"]`` and return
        ``loss`` (float) and ``num-examples`` (int); ``fedplug.toolkit.metrics`` builds the dict.
        """
        spec = SPECS[0]
        x, y = _batch(spec)
        cfg = {**config, "local-epochs": 5, "batch-size": 16, "server-round": 1}
        model = backend.build_model(declared_model, spec, cfg)
        before = backend.evaluate(model, x, y, cfg)["loss"]
        metrics = backend.train(model, x, y, cfg)
        after = backend.evaluate(model, x, y, cfg)["loss"]
        assert after < before, (
            f"'{declared_model}': 5 local epochs on a fixed batch did not lower the loss ({before:.4f} -> {after:.4f})"
        )
        assert isinstance(metrics.get("loss"), float), f"train must return a float 'loss', got {metrics!r}"
        assert metrics.get("num-examples") == len(y) and type(metrics["num-examples"]) is int, (
            f"train must return 'num-examples' = {len(y)} as an int, got {metrics.get('num-examples')!r}"
        )

    def test_evaluate_returns_standard_metrics(self, backend: Backend, config: dict[str, Any]) -> None:
        """``evaluate`` returns Python floats ``loss`` and ``accuracy`` in [0, 1] and an int ``num-examples``.

        Fix: convert framework scalars with ``float()``/``int()`` (``fedplug.toolkit.metrics``).
        """
        spec = SPECS[0]
        x, y = _batch(spec, n=20)
        metrics = backend.evaluate(backend.build_model(str(config["model"]), spec, config), x, y, config)
        for key in ("loss", "accuracy"):
            assert type(metrics.get(key)) is float, f"evaluate must return '{key}' as a Python float, got {metrics!r}"
        assert 0.0 <= metrics["accuracy"] <= 1.0, f"accuracy must be a fraction in [0, 1], got {metrics['accuracy']}"
        assert metrics.get("num-examples") == len(y) and type(metrics["num-examples"]) is int, (
            f"evaluate must return 'num-examples' = {len(y)} as an int, got {metrics.get('num-examples')!r}"
        )

    def test_same_seed_same_weights(self, backend: Backend, config: dict[str, Any], declared_model: str) -> None:
        """Every model is bit-deterministic: same seed, same data -> same weights (build and train).

        Fix: seed the model init from ``config["seed"]`` and take the example order from
        ``fedplug.toolkit.example_order``; never use global random state.
        """
        spec = SPECS[0]
        x, y = _batch(spec, n=32)
        cfg = {**config, "local-epochs": 1, "batch-size": 8, "server-round": 1}
        runs = []
        for _ in range(2):
            model = backend.build_model(declared_model, spec, cfg)
            backend.train(model, x, y, cfg)
            runs.append(backend.get_weights(model))
        for key in runs[0]:
            np.testing.assert_allclose(
                runs[1][key],
                runs[0][key],
                rtol=0,
                atol=self.determinism_atol,
                err_msg=f"'{declared_model}': {key} differs between two runs with seed {cfg['seed']}: seed the model "
                "init and the shuffling from config['seed'] (and config['server-round'])",
            )

    def test_rounds_differ(self, backend: Backend, config: dict[str, Any], declared_model: str) -> None:
        """The example order depends on ``server-round``: the same start weights trained in rounds 1 and 2 differ.

        Fix: order the examples with ``fedplug.toolkit.example_order(config, n, epoch)`` (seed, round, node, epoch).
        """
        x, y = _batch(SPECS[0], n=32)
        _, fit = self._trainer(backend, declared_model, {**config, "batch-size": 8, "local-epochs": 1})
        first, second = fit(x, y, **{"server-round": 1}), fit(x, y, **{"server-round": 2})
        assert _differ(first, second), (
            f"'{declared_model}': training in round 1 and round 2 gave the same weights: make the example order "
            "depend on config['server-round'] (fedplug.toolkit.example_order)"
        )

    def test_train_keeps_no_state(self, backend: Backend, config: dict[str, Any], declared_model: str) -> None:
        """``train`` keeps nothing from one call to the next: the core reuses one model for every node and round.

        Training partition A then B on one model must equal training B on a fresh model with the same
        weights set, with plain SGD, SGD with momentum and Adam (those not declared ``unsupported``):
        plain SGD alone would not tell momentum buffers or Adam moments kept from the last call.
        Fix: create optimizer state (momentum, Adam moments, step counters, RNG) in each
        ``train`` call, or reset it there; read every setting from that call's config.
        """
        spec = SPECS[0]
        x, y = _batch(spec, n=48, seed=3)
        part_a, part_b = (x[:24], y[:24]), (x[24:], y[24:])
        cfg = {**config, "batch-size": 8, "local-epochs": 1, "server-round": 1}
        model = backend.build_model(declared_model, spec, cfg)
        fresh_model = backend.build_model(declared_model, spec, cfg)
        cases: dict[str, dict[str, Scalar]] = {}
        for case in ("sgd", "sgd+momentum", "adam"):
            overrides = declared_case(backend, OPTIMISER_CASES[case])
            if overrides is not None and overrides not in cases.values():
                cases[case] = overrides
        for case, overrides in cases.items():
            _, fit = self._trainer(backend, declared_model, {**cfg, **overrides}, spec, model=model)
            fit(*part_a, **{"lr": float(overrides["lr"]) * 2, "server-round": 3, "partition-id": 1})
            reused = fit(*part_b)
            fresh = fit(*part_b, target=fresh_model)
            fresh_model = backend.build_model(declared_model, spec, cfg)  # unused by any train call yet
            for key in fresh:
                np.testing.assert_allclose(
                    reused[key],
                    fresh[key],
                    rtol=0,
                    atol=self.determinism_atol,
                    err_msg=f"'{declared_model}': training A then B on one model differs from B on a fresh model "
                    f"({key}, {case} {overrides}): train keeps state between calls; create or reset optimizer state "
                    "(momentum buffers, Adam moments and step count) and RNGs in every train call",
                )

    def test_optimizer_keys_read_every_call(
        self, backend: Backend, config: dict[str, Any], declared_model: str
    ) -> None:
        """``lr``, ``momentum``, ``weight-decay`` and ``optimizer`` take effect, and are read anew on every call;
        a new ``lr`` compiles nothing.

        The server may send new values every round. Fix: build the optimizer from this call's
        settings (``fedplug.toolkit.TrainSettings.from_config(config)``) in every ``train`` call; a key
        a backend cannot honour goes in ``unsupported``. A framework that compiles (traces) its step
        must take the hyper-parameters as data (arrays, tensors), not as Python constants baked into
        the compiled step, or it compiles again every round; ``rebuild_probes()`` tells when it compiled.
        """
        x, y = _batch(SPECS[0], n=32)
        cfg = {**config, "batch-size": 8, "local-epochs": 1, "server-round": 1}
        model = backend.build_model(declared_model, SPECS[0], cfg)
        _, fit = self._trainer(backend, declared_model, cfg, model=model)
        probes = self.rebuild_probes()
        lr = float(cfg["lr"])
        trials: dict[str, tuple[Any, Any]] = {"lr": (lr, lr * 3)}
        if "momentum" not in backend.unsupported:
            trials["momentum"] = (0.0, 0.9)
        if "weight-decay" not in backend.unsupported:
            trials["weight-decay"] = (0.0, 0.05)
        if "optimizer=adam" not in backend.unsupported and "optimizer=sgd" not in backend.unsupported:
            trials["optimizer"] = ("sgd", "adam")
        for key, (one, other) in trials.items():
            plain = {"optimizer": "sgd"} if key in ("momentum", "lr") else {}  # momentum is SGD's
            first = fit(x, y, **{**plain, key: one})
            compiled = probe_state(probes, model)
            changed = fit(x, y, **{**plain, key: other})
            again = fit(x, y, **{**plain, key: one})
            if key == "lr" and tells(compiled):
                now = probe_state(probes, model)
                assert now == compiled, (
                    f"'{declared_model}': training again with another lr ({other}, then {one}) traced or compiled "
                    f"again (rebuild probes {compiled} -> {now}): pass lr, momentum, weight decay, proximal-mu and "
                    "Adam's bias corrections to the compiled step as data (arrays or tensors), not as Python "
                    "constants, so that a new value every round compiles nothing (fedplug.testing.rebuilds)"
                )
            assert _differ(first, changed), (
                f"'{declared_model}': changing '{key}' from {one} to {other} changed nothing: read config['{key}'] "
                "in every train call"
            )
            assert not _differ(first, again), (
                f"'{declared_model}': '{key}' = {one} gave other weights after a call with {other}: the backend "
                f"kept '{key}' (or optimizer state) from an earlier call; read config['{key}'] in every train call"
            )

    @pytest.mark.parametrize("key", list(OPTIMISER_KEYS))
    def test_optimizer_keys_honoured_or_declared(
        self, backend: Backend, config: dict[str, Any], small_models: Models, key: str
    ) -> None:
        """Every optimiser key of the contract changes training, or the backend declares it in ``unsupported``
        and the core refuses a run that needs it.

        Keys: ``momentum`` (SGD), ``weight-decay``, ``proximal-mu`` (FedProx) and the value
        ``optimizer=adam``. A key ignored silently would make a mixed federation run two algorithms.
        Fix: implement it as ``fedplug.toolkit.TrainSettings`` defines it, or declare it (``"momentum"``,
        ``"optimizer=adam"``, ...) in ``unsupported`` so that ``fedplug run`` refuses it in one line.
        """
        uses = OPTIMISER_KEYS[key]
        base: dict[str, Any] = {"optimizer": "sgd", "momentum": 0.0, "weight-decay": 0.0, "lr": 0.05}
        if key in backend.unsupported:
            needs = {**config, **base, **uses, "strategy": "fedprox" if key == "proximal-mu" else config["strategy"]}
            with pytest.raises(ConfigError, match="does not"):
                check_supported(backend, needs)
            return
        spec = spec_for("mlp")
        cfg: dict[str, Any] = {**resolve(backend, {"hidden-dims": "16"}), **STEPS, **base}
        if ("mlp", "own") not in small_models:  # the backend's own start weights: this check needs no reference
            built = backend.build_model("mlp", spec, cfg)
            small_models["mlp", "own"] = (built, None, backend.get_weights(built))
        _, fit = self._trainer(backend, "mlp", cfg, spec, model=small_models["mlp", "own"][0])
        x, y = training_batch(spec)
        without, using = fit(x, y), fit(x, y, **uses)
        assert _differ(without, using), (
            f"'{key}' ({uses}) changed nothing in training: implement it as fedplug.toolkit.TrainSettings "
            f"defines it, or declare unsupported = frozenset({{'{key}'}}) so that fedplug refuses it"
        )

    def test_proximal_term_applied(self, backend: Backend, config: dict[str, Any], declared_model: str) -> None:
        """FedProx's proximal term ``mu / 2 * ||w - w_start||^2`` keeps weights nearer the round's start, or the
        backend declares ``"proximal-mu"`` in ``unsupported`` and the core refuses ``--strategy fedprox``.

        Fix: add ``config["proximal-mu"]`` times ``(w - w_start)`` to each gradient (mu 0: plain training), or
        declare ``unsupported = frozenset({"proximal-mu"})``. Never ignore it silently.
        """
        if "proximal-mu" in backend.unsupported:
            with pytest.raises(ConfigError, match="proximal"):
                check_supported(backend, {**config, "strategy": "fedprox"})
            return
        x, y = _batch(SPECS[0], n=32)
        cfg = {**config, "batch-size": 8, "local-epochs": 2, "server-round": 1}
        start, fit = self._trainer(backend, declared_model, cfg)
        mu = 0.5 / float(cfg["lr"])  # strong, and stable for SGD with or without momentum
        free, held = _drift(fit(x, y, **{"proximal-mu": 0.0}), start), _drift(fit(x, y, **{"proximal-mu": mu}), start)
        assert held < free, (
            f"'{declared_model}': proximal-mu {mu:g} did not keep the weights nearer the round's start "
            f"(squared drift {held:.3g} vs {free:.3g} without): apply FedProx's proximal term, or declare "
            "unsupported = frozenset({'proximal-mu'}) so that fedplug refuses --strategy fedprox"
        )

    # -- native save format ----------------------------------------------------------------

    def test_save_load_gives_identical_predictions(
        self,
        backend: Backend,
        config: dict[str, Any],
        declared_model: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Every model saves in the native format and loads back, predicting the same, without pickle.

        Fix: if the framework's usual format is pickle (``torch.save`` of a module, ``np.save`` of
        objects), write the weights as safetensors, Flax msgpack or ``.npz`` and load them with
        ``weights_only``/``allow_pickle=False``. The check catches pickle under any name (``from pickle
        import loads`` too) and any unpickling that looks up a class.
        """
        spec = SPECS[1]
        x, y = _batch(spec, n=16)
        model = backend.build_model(declared_model, spec, config)
        backend.train(model, x, y, {**config, "server-round": 1})
        path = tmp_path / f"model{backend.file_suffix}"
        backend.save(model, path)
        assert path.is_file() and path.stat().st_size > 0, f"save() wrote nothing at {path}"
        other = backend.build_model(declared_model, spec, {**config, "seed": int(config["seed"]) + 1})

        guard_pickle(monkeypatch)
        try:
            loaded = backend.load(other, path)
        finally:
            unpickled = pickle_used()
            monkeypatch.undo()
        assert not unpickled, (
            f"load() used pickle (it looked up {unpickled[:3]}): read the native format without unsafe "
            f"deserialization: use {SAFE_FORMATS}"
        )
        np.testing.assert_allclose(
            np.asarray(backend.predict(loaded, x)),
            np.asarray(backend.predict(model, x)),
            rtol=0,
            atol=1e-6,
            err_msg=f"the loaded '{declared_model}' predicts differently from the saved one",
        )

    # -- Flower ClientApp ------------------------------------------------------------------

    def test_client_app_handles_train_and_evaluate_messages(self, backend: Backend) -> None:
        """fedplug's ClientApp serves the backend: a train and an evaluate Message get well-formed replies.

        The Messages are built as a SuperNode delivers them (``fedplug.flower_adapter.message_for_client_app``).
        Fix: return Python int/float metrics, take and give canonical weights.
        """
        from flwr.app import ConfigRecord, Context, MessageType, RecordDict

        from fedplug.apps import client_app
        from fedplug.data import data_spec
        from fedplug.flower_adapter import message_for_client_app
        from fedplug.records import from_record, to_record

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
        replies = {}
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            content = RecordDict(
                {"arrays": to_record(sent), "config": ConfigRecord({"lr": config["lr"], "server-round": 1})}
            )
            # as Flower's runtimes deliver a message to a ClientApp (complete metadata);
            # Message(content, dst_node_id, message_type) needs a running ServerApp
            message = message_for_client_app(
                content, message_type=kind, run_id=1, message_id=f"{kind}-1", dst_node_id=1, group_id="1"
            )
            try:
                replies[kind] = client_app(message, context)
            except Exception as error:
                pytest.fail(
                    f"the ClientApp failed on a {kind} message: {type(error).__name__}: {error}; "
                    "train/evaluate must return Python int/float metrics and take canonical weights"
                )
        for kind, reply in replies.items():
            assert not reply.has_error(), f"the ClientApp failed on a {kind} message: {reply.error}"
            metrics = reply.content.metric_records["metrics"]
            count = metrics.get("num-examples")
            assert isinstance(count, int | float) and count > 0, f"{kind} reply lacks a positive num-examples"
        trained = from_record(replies[MessageType.TRAIN].content.array_records["arrays"])
        assert list(trained) == list(sent), "the train reply must carry the canonical weights, same names and order"
        assert any(not np.array_equal(trained[k], sent[k]) for k in sent), "training did not change the weights"
        assert {"loss", "accuracy"} <= set(replies[MessageType.EVALUATE].content.metric_records["metrics"]), (
            "the evaluate reply must carry 'loss' and 'accuracy'"
        )

    def test_client_app_serves_node_capabilities(self, backend: Backend) -> None:
        """A strategy's node capabilities work with the backend (``fedplug.capabilities.BACKEND_DUTIES``).

        Two train Messages to one node (one ``Context``), for a probe strategy that needs ``reply-arrays``
        (the node's update as an extra record) and ``node-state`` (a count of its steps): the replies carry
        the weights, the update (exactly trained - sent, canonical names) and the state, which the node
        keeps across the two rounds. Fix: ``get_weights`` must return fresh canonical numpy arrays and
        ``train`` keep no state of its own.
        """
        from flwr.app import ConfigRecord, Context, MessageType, RecordDict

        from fedplug.apps import client_app
        from fedplug.capabilities import STATE_RECORD, Probe

        def same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
            atol = self.determinism_atol  # a framework that cannot be deterministic on CPU says how far it strays
            return list(a) == list(b) and all(np.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)

        from fedplug.data import data_spec
        from fedplug.flower_adapter import message_for_client_app
        from fedplug.plugins import RegisteredStrategy
        from fedplug.records import from_record, to_record

        registry = get_registry()
        registry.strategies.setdefault(Probe.name, RegisteredStrategy(Probe(), "fedplug.testing", "fedplug-core", ""))
        try:
            overrides = {"num-supernodes": 20, "local-epochs": 1, "strategy": Probe.name, "model": "lenet"}
            config = self._config(backend, **overrides)
            model = backend.build_model(str(config["model"]), data_spec(config), config)
            sent = backend.get_weights(model)
            node: dict[str, Scalar] = {"partition-id": 0, "num-partitions": 20}
            context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=config)
            first: dict[str, np.ndarray] = {}
            for server_round in (1, 2):
                content = RecordDict(
                    {"arrays": to_record(sent), "config": ConfigRecord({"lr": config["lr"], "server-round": 1})}
                )
                message = message_for_client_app(
                    content,
                    message_type=MessageType.TRAIN,
                    run_id=1,
                    message_id=f"t{server_round}",
                    dst_node_id=1,
                    group_id=str(server_round),
                )
                reply = client_app(message, context)
                assert not reply.has_error(), f"the ClientApp failed with a node-capability strategy: {reply.error}"
                records = reply.content.array_records
                assert list(records) == ["arrays", "update", STATE_RECORD], list(records)
                trained, update = from_record(records["arrays"]), from_record(records["update"])
                assert list(update) == list(sent)
                assert all(np.array_equal(update[k], trained[k] - sent[k]) for k in sent), "update != trained - sent"
                assert any(np.any(update[k]) for k in sent), "the node's update is zero: train changed no weight"
                if server_round == 2:  # the same message again: only the core's node state may differ
                    assert same_weights(update, first), (
                        "the same train message gave another update the second time: train kept state between "
                        "calls, which only the strategy's node state may do"
                    )
                first = update
                steps = from_record(records[STATE_RECORD])["steps"]
                assert int(steps) == server_round, f"the node state was not kept across rounds: {int(steps)}"
        finally:
            registry.strategies.pop(Probe.name, None)


class BackendConformance(BasicConformance):
    """The mixable tier: the basic checks, and what lets the backend's nodes join a federation of other frameworks.

    The shared models keep the canonical layout and predict and train as the numpy reference does.
    Subclass with ``backend_name = "..."`` for a backend that declares ``conformance = "mixable"``.
    """

    tier: ClassVar[str] = "mixable"

    @pytest.mark.parametrize("model_name", SHARED_MODELS)
    @pytest.mark.parametrize("spec", SPECS[:2], ids=str)
    def test_canonical_layout(
        self, backend: Backend, reference: NumpyBackend, config: dict[str, Any], model_name: str, spec: DataSpec
    ) -> None:
        """The shared models' weights have the reference's names, order, shapes and dtype.

        Fix: convert at ``get_weights``/``set_weights`` (``fedplug.toolkit`` has the usual conversions).
        """
        for name in with_declared_bn(backend, model_name):
            expected = reference.get_weights(reference.build_model(name, spec, config))
            got = backend.get_weights(backend.build_model(name, spec, config))
            assert list(got) == list(expected), (
                f"'{name}' weights must be named and ordered {list(expected)}, got {list(got)}"
            )
            for key, array in got.items():
                assert isinstance(array, np.ndarray), f"{key} must be a numpy array, got {type(array).__name__}"
                assert array.shape == expected[key].shape, (
                    f"{key} of '{name}' must have canonical shape {expected[key].shape} (dense (out, in), "
                    f"conv (out, in, kh, kw), normalisation (channels,)), got {array.shape}"
                )
                assert array.dtype == expected[key].dtype, f"{key} must be {expected[key].dtype}, got {array.dtype}"

    def _assert_reference_predictions(
        self, backend: Backend, reference: NumpyBackend, model_name: str, pool: str, spec: DataSpec
    ) -> None:
        config = self._config(backend, pool=pool)
        numpy_model = reference.build_model(model_name, spec, config)
        model = backend.build_model(model_name, spec, config)
        try:
            backend.set_weights(model, reference.get_weights(numpy_model))
        except Exception as error:
            pytest.fail(
                f"set_weights() refused the reference's canonical '{model_name}' weights for {spec}: "
                f"{type(error).__name__}: {error}; convert from the canonical layout at set_weights"
            )
        x, _ = _batch(spec, n=8)
        np.testing.assert_allclose(
            np.asarray(backend.predict(model, x)),
            reference.predict(numpy_model, x),
            rtol=1e-3,
            atol=self.prediction_atol,
            err_msg=f"'{model_name}' (pool {pool}) with the reference weights predicts differently for {spec}: "
            "check the layout conversion at get/set and that flattening follows channels-first (C, H, W) order",
        )

    @pytest.mark.parametrize(("model_name", "pool"), [("mlp", "max"), ("lenet", "max"), ("lenet", "avg")])
    @pytest.mark.parametrize("spec", SPECS[1:3], ids=str)
    def test_same_predictions_as_numpy_reference(
        self, backend: Backend, reference: NumpyBackend, model_name: str, pool: str, spec: DataSpec
    ) -> None:
        """With the reference's weights, ``mlp`` and ``lenet`` (max and avg pool) give the reference's logits.

        Tolerance: ``|logits - reference| <= prediction_atol (1e-4) + 1e-3 * |reference|``; the bundled
        backends agree within 1.4e-6. This is what lets nodes of different frameworks share one model.
        Fix: convert layouts at get/set, flatten in ``(C, H, W)`` order, return logits (no softmax).
        """
        self._assert_reference_predictions(backend, reference, model_name, pool, spec)

    @pytest.mark.parametrize(("model_name", "pool"), [("mlp", "max"), ("lenet", "max"), ("lenet", "avg")])
    def test_odd_image_sizes_match_reference(
        self, backend: Backend, reference: NumpyBackend, config: dict[str, Any], model_name: str, pool: str
    ) -> None:
        """On 29x31 images the shared models have the reference's shapes and logits.

        2x2 pooling with stride 2 drops an odd last row/column (floor), as PyTorch, Keras
        ('valid') and Flax do. Same tolerance as ``test_same_predictions_as_numpy_reference``.
        Fix: no 'same' padding and no ceil mode in the shared models' pools.
        """
        expected = reference.get_weights(reference.build_model(model_name, ODD_SPEC, config))
        try:
            got = backend.get_weights(backend.build_model(model_name, ODD_SPEC, config))
        except Exception as error:
            pytest.fail(
                f"'{model_name}' (pool {pool}) fails to build on {ODD_SPEC} ({type(error).__name__}: "
                f"{str(error)[:300]}): {ODD_POOLING}",
                pytrace=False,
            )
        shapes = {key: value.shape for key, value in got.items()}
        assert shapes == {key: value.shape for key, value in expected.items()}, (
            f"'{model_name}' on {ODD_SPEC} must have the canonical shapes "
            f"{ {key: value.shape for key, value in expected.items()} }, got {shapes} (dense (out, in), "
            f"conv (out, in, kh, kw)); {ODD_POOLING}"
        )
        try:
            self._assert_reference_predictions(backend, reference, model_name, pool, ODD_SPEC)
        except AssertionError:
            raise
        except Exception as error:  # the framework's own shape error: say what causes it
            pytest.fail(
                f"'{model_name}' (pool {pool}) fails to predict on {ODD_SPEC} ({type(error).__name__}: "
                f"{str(error)[:300]}): {ODD_POOLING}",
                pytrace=False,
            )

    @pytest.mark.parametrize("case", list(OPTIMISER_CASES))
    @pytest.mark.parametrize("model_name", SHARED_MODELS)
    def test_train_matches_reference(self, backend: Backend, small_models: Models, model_name: str, case: str) -> None:
        """One ``train`` call from the reference's weights lands on the reference's weights (``training_atol``).

        Same start, data (24 tiny images, ``fedplug.testing.reference``), core example order and
        optimiser: plain SGD, SGD with momentum, Adam, and SGD with momentum, weight decay and
        FedProx's term (keys declared in ``unsupported`` left out). This is what makes a federation
        of nodes with different frameworks follow one trajectory. Tolerance: max |w - w_ref| <=
        ``training_atol`` (1e-5); the bundled backends are within 2.3e-7.
        Fix: visit examples in ``settings.batches(n)`` (every mini-batch of every epoch: loop over it
        once, not once per epoch), average the loss over each mini-batch, and implement the update of
        ``fedplug.numpy_backend.ReferenceOptimizer`` exactly (PyTorch's ``SGD``/``Adam``: coupled weight
        decay, no dampening or Nesterov, Adam's epsilon after the bias correction), with fresh state every call.
        """
        overrides = declared_case(backend, OPTIMISER_CASES[case])
        if overrides is None:  # the backend declares it lacks this optimizer: the core must refuse it
            with pytest.raises(ConfigError, match="does not support"):
                check_supported(backend, {**resolve(backend, {}), **OPTIMISER_CASES[case]})
            return
        gap, model_name = max(
            (reference_gap(backend, name, overrides, models=small_models), name)
            for name in with_declared_bn(backend, model_name)
        )  # lenet-bn: its running statistics too (BN_MOMENTUM, the batch's unbiased variance)
        assert gap <= self.training_atol, (
            f"'{model_name}' trained with {overrides} lands {gap:.3g} from the numpy reference's weights "
            f"(tolerance {self.training_atol:g}): visit the examples in the core's order (settings.batches(n) "
            "yields every mini-batch of every epoch), average the loss per mini-batch, and make each step the "
            "update of fedplug.numpy_backend.ReferenceOptimizer"
            + (f"; {ADAM_HINT}" if overrides.get("optimizer") == "adam" else "")
        )
