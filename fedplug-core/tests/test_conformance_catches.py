"""The conformance suite catches the mistakes a new plugin author makes, each with a message that says what to do.

Each test injects one mistake into a small backend (the numpy reference with one thing done
wrong, as a plugin author might), runs the real check on it, and asserts that the check fails
with its message; where it matters, the same backend without the mistake passes.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from pickle import dumps, loads
from typing import Any, ClassVar

import numpy as np
import pytest

from fedplug.backend import Config, DataSpec, Scalar, Weights
from fedplug.config import ConfigError, defaults_for, resolve
from fedplug.display import availability, backends_rows, console, description_text, show_info, tier_text
from fedplug.numpy_backend import (
    NumpyBackend,
    NumpyImplementation,
    NumpyModel,
    Pool,
    ReferenceOptimizer,
    softmax_cross_entropy,
)
from fedplug.plugins import Registered, Registry
from fedplug.testing import BackendConformance, BasicConformance
from fedplug.testing.rebuilds import Probe, count_rebuilds
from fedplug.toolkit import ADAM_BETAS, TrainSettings, metrics

pytestmark = pytest.mark.fast

SPEC = DataSpec((1, 28, 28), 10)
HERE = __name__
"""This module, as the test backends' ``implementation`` names it."""
FAILED = (AssertionError, pytest.fail.Exception)


def train_with(
    optimizer: Callable[[TrainSettings, list[np.ndarray]], ReferenceOptimizer],
    model: NumpyModel,
    x: np.ndarray,
    y: np.ndarray,
    config: Config,
) -> dict[str, float]:
    """The numpy reference's ``train``, with another optimiser."""
    settings = TrainSettings.from_config(config)
    params = model.params  # the trained arrays (batch normalisation's running statistics are not)
    step = optimizer(settings, params)
    x = x.reshape(len(x), -1) if model.name == "mlp" else x
    loss_sum = 0.0
    model.train_mode(True)
    try:
        for idx in settings.batches(len(y)):
            loss, grad = softmax_cross_entropy(model.forward(x[idx]), y[idx])
            loss_sum += loss * len(idx)
            step.step(params, model.backward(grad))
    finally:
        model.train_mode(False)
    return metrics(loss_sum, 0, len(y) * settings.epochs, len(y))


def config_of(backend: NumpyBackend) -> dict[str, Any]:
    return resolve(backend, {})


# -- 1. optimiser state kept from one call to the next ---------------------------------------


class KeepsOptimizer(NumpyImplementation):
    """Builds its optimiser once per model and keeps its momentum buffers, Adam moments and step count."""

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self.optimizers: dict[int, ReferenceOptimizer] = {}

    def train(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        settings = TrainSettings.from_config(config)
        params = list(model.weights.values())
        kept = self.optimizers.get(id(model))
        if kept is None or kept.settings.optimizer != settings.optimizer:
            kept = self.optimizers[id(model)] = ReferenceOptimizer(settings, params)
        kept.settings = settings  # this call's lr and momentum: only the state is kept
        return train_with(lambda settings, params: kept, model, x, y, config)


class KeepsOptimizerBackend(NumpyBackend):
    name = "keeps"
    implementation = f"{HERE}:KeepsOptimizer"


class KeepsOptimizerPlainSgdOnly(KeepsOptimizerBackend):
    unsupported = frozenset({"momentum", "optimizer=adam"})


def test_optimizer_state_kept_between_calls_is_caught() -> None:
    backend = KeepsOptimizerBackend()
    with pytest.raises(FAILED, match=r"train keeps state between calls.*momentum buffers, Adam moments"):
        BackendConformance().test_train_keeps_no_state(backend, config_of(backend), "mlp")


def test_plain_sgd_alone_cannot_tell_kept_state() -> None:
    """Why the check trains with momentum and Adam too: with plain SGD the kept state is never read."""
    backend = KeepsOptimizerPlainSgdOnly()
    BackendConformance().test_train_keeps_no_state(backend, config_of(backend), "mlp")


# -- 2. Adam's epsilon before the bias correction (Keras's and MXNet's own Adam) ------------------


class EpsilonBeforeCorrection(ReferenceOptimizer):
    """Keras's Adam: ``lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)``, ``w -= lr_t * m / (sqrt(v) + 1e-7)``."""

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        if self.settings.optimizer != "adam":
            super().step(params, grads)
            return
        self.steps += 1
        beta1, beta2 = ADAM_BETAS
        rate = self.settings.lr * math.sqrt(1 - beta2**self.steps) / (1 - beta1**self.steps)
        for i, (param, g) in enumerate(zip(params, grads, strict=True)):
            self.first[i] = beta1 * self.first[i] + (1 - beta1) * g
            self.second[i] = beta2 * self.second[i] + (1 - beta2) * g * g
            param -= rate * self.first[i] / (np.sqrt(self.second[i]) + 1e-7)


class KerasAdam(NumpyImplementation):
    def train(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        return train_with(EpsilonBeforeCorrection, model, x, y, config)


class KerasAdamBackend(NumpyBackend):
    name = "kerasadam"
    implementation = f"{HERE}:KerasAdam"


def test_adam_epsilon_before_the_bias_correction_is_named() -> None:
    backend = KerasAdamBackend()
    with pytest.raises(AssertionError) as failed:
        BackendConformance().test_train_matches_reference(backend, {}, "lenet", "adam")
    message = str(failed.value)
    assert "fedplug.numpy_backend.ReferenceOptimizer" in message
    assert "epsilon goes after the bias correction" in message and "Keras's and MXNet's own Adam" in message
    assert "TrainSettings defines" not in message, "TrainSettings holds the settings, not the update"
    BackendConformance().test_train_matches_reference(backend, {}, "lenet", "sgd+momentum")  # SGD is right


class EpochLoopAroundBatches(NumpyImplementation):
    """Loops over the epochs around ``settings.batches(n)``, which already yields every epoch's batches."""

    def train(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        for _ in range(int(config["local-epochs"])):
            super().train(model, x, y, config)
        return super().evaluate(model, x, y, config)


class EpochLoopBackend(NumpyBackend):
    name = "epochloop"
    implementation = f"{HERE}:EpochLoopAroundBatches"


def test_an_epoch_loop_around_the_batches_is_named() -> None:
    backend = EpochLoopBackend()
    with pytest.raises(AssertionError, match=r"settings\.batches\(n\) yields every mini-batch of every epoch"):
        BackendConformance().test_train_matches_reference(backend, {}, "mlp", "sgd")


# -- 3. the framework imported by the descriptor's module ----------------------------------------


def test_heavy_descriptor_import_gets_the_implementation_module_advice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fakeframework.py").write_text("")
    (tmp_path / "heavy_descriptor.py").write_text(
        "import fakeframework  # the mistake: the framework at the top of the descriptor's module\n"
        "import fedplug\n"
        "from fedplug.numpy_backend import NumpyBackend\n\n\n"
        "class HeavyBackend(NumpyBackend):\n"
        "    name = 'heavy'\n"
        "    framework = fedplug.Framework('fakeframework', 'fakeframework')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{':'.join(sys.path)}")
    from heavy_descriptor import HeavyBackend  # type: ignore[import-not-found]

    with pytest.raises(AssertionError) as failed:
        BackendConformance().test_plugin_import_is_light(HeavyBackend())
    message = str(failed.value)
    assert "importing heavy_descriptor imports fakeframework" in message
    assert "only in the implementation module (implementation = 'fedplug.numpy_backend:NumpyImplementation')" in (
        message
    )
    assert "inside the backend's methods" not in message, "the advice of the fedplug 0.1 contract"


# -- 4. pooling that rounds up ----------------------------------------------------------------------


class CeilPool(Pool):
    """2x2 pooling in ceil mode: an odd last row/column is padded (repeated) instead of dropped."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        _, _, h, w = x.shape
        return super().forward(np.pad(x, ((0, 0), (0, 0), (0, h % 2), (0, w % 2)), mode="edge"))


class CeilPooling(NumpyImplementation):
    def build_model(self, model: str, spec: DataSpec, config: Config) -> NumpyModel:
        built = super().build_model(model, spec, config)
        built.layers = [CeilPool(layer.kind) if isinstance(layer, Pool) else layer for layer in built.layers]
        return built


class CeilPoolingBackend(NumpyBackend):
    name = "ceilpool"
    implementation = f"{HERE}:CeilPooling"


def test_pooling_that_rounds_up_is_explained_not_left_to_a_shape_error() -> None:
    backend = CeilPoolingBackend()
    with pytest.raises(pytest.fail.Exception) as failed:
        BackendConformance().test_odd_image_sizes_match_reference(
            backend, NumpyBackend(), config_of(backend), "lenet", "max"
        )
    message = str(failed.value)
    assert "'lenet' (pool max) fails to predict on DataSpec(input_shape=(3, 29, 31)" in message
    assert "ValueError" in message  # the framework's own error, kept
    assert "2x2 pooling must drop an odd last row/column (floor: no padding, no ceil mode)" in message
    assert "25x27 -> 12x13 -> 8x9 -> 4x4" in message


# -- 5. a platform problem checked in check_config: list says available, run refuses -----------------


class NeedsDevice(NumpyBackend):
    name = "needsdevice"
    defaults: ClassVar[Mapping[str, Scalar]] = {**NumpyBackend.defaults, "needsdevice.device": "gpu"}

    def check_config(self, config: Config) -> None:
        if config["needsdevice.device"] == "gpu":  # the mistake: what the machine lacks, found only at run time
            raise ConfigError("needsdevice.device 'gpu': no GPU on this machine")


def test_defaults_refused_where_check_available_passes_are_caught() -> None:
    backend = NeedsDevice()
    with pytest.raises(pytest.fail.Exception) as failed:
        BackendConformance().test_default_config_complete_and_typed(backend, defaults_for(backend))
    message = str(failed.value)
    assert "fedplug run needsdevice refuses the backend's own default run config here" in message
    assert "no GPU on this machine" in message
    assert "in check_available(config), raising fedplug.BackendUnavailable" in message


def test_fedplug_list_says_unavailable_where_run_would_refuse() -> None:
    registry = Registry({"needsdevice": Registered(NeedsDevice(), "needsdevice", "fedplug-needsdevice", "0.1.0")})
    (row,) = backends_rows(registry)
    assert row["framework_installed"] is True
    assert row["available"] is False
    assert "no GPU on this machine" in row["problem"]
    assert availability(NumpyBackend()) is None


def test_fedplug_info_shows_availability_and_tier() -> None:
    with console.capture() as captured:
        show_info(NeedsDevice())
    shown = captured.get()
    assert "available: no: needsdevice.device 'gpu': no GPU on this machine" in shown
    assert "conformance: mixable (can join mixed federations)" in shown
    assert "models: mlp, lenet" in shown and "needsdevice.device" in shown  # and the default run config
    with console.capture() as captured:
        show_info(BasicOnly())
    assert "available: yes" in captured.get() and "conformance: basic (works alone)" in captured.get()


# -- 6. the description doubles the name ------------------------------------------------------------


class DoubledName(NumpyBackend):
    name = "doubled"
    description = "doubled: NumPy MLP and LeNet"


def test_a_description_that_repeats_the_name_is_caught() -> None:
    backend = DoubledName()
    with pytest.raises(AssertionError, match=r"starts with the backend's name: fedplug shows 'doubled: <desc"):
        BackendConformance().test_default_config_complete_and_typed(backend, config_of(backend))


def test_fedplug_shows_a_name_in_a_description_once() -> None:
    """A backend written for fedplug 0.1, whose generated description began with its name, still reads well."""
    registry = Registry({"doubled": Registered(DoubledName(), "doubled", "fedplug-doubled", "0.1.0")})
    (row,) = backends_rows(registry)
    assert row["description"] == description_text(DoubledName()) == "NumPy MLP and LeNet"
    assert description_text(NumpyBackend()) == NumpyBackend.description


# -- 7. hyper-parameters baked into a compiled step --------------------------------------------------


class CompilesPerValue(NumpyImplementation):
    """A stand-in for a kernel-compiling framework: a 'kernel' per distinct key, counted in ``compiled``."""

    bakes_lr: ClassVar[bool] = True

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self.compiled: set[tuple[Any, ...]] = set()

    def train(self, model: NumpyModel, x: np.ndarray, y: np.ndarray, config: Config) -> dict[str, float]:
        settings = TrainSettings.from_config(config)
        shape = (model.name, settings.optimizer, settings.batch_size)
        self.compiled.add((*shape, settings.lr) if self.bakes_lr else shape)  # lr a constant, or data
        return super().train(model, x, y, config)


class PassesLrAsData(CompilesPerValue):
    bakes_lr = False


class CompilesPerValueBackend(NumpyBackend):
    name = "compiles"
    implementation = f"{HERE}:CompilesPerValue"


class PassesLrAsDataBackend(NumpyBackend):
    name = "compilesonce"
    implementation = f"{HERE}:PassesLrAsData"


def suite_with_probe(backend: NumpyBackend) -> BackendConformance:
    class Suite(BackendConformance):
        def rebuild_probes(self) -> list[Probe]:
            return [*super().rebuild_probes(), lambda model: len(backend.impl.compiled)]  # type: ignore[attr-defined]

    return Suite()


def test_a_new_lr_that_compiles_again_is_caught() -> None:
    backend = CompilesPerValueBackend()
    with pytest.raises(AssertionError) as failed:
        suite_with_probe(backend).test_optimizer_keys_read_every_call(backend, config_of(backend), "mlp")
    message = str(failed.value)
    assert "training again with another lr" in message and "traced or compiled again" in message
    assert "as data (arrays or tensors), not as Python constants" in message
    fixed = PassesLrAsDataBackend()
    suite_with_probe(fixed).test_optimizer_keys_read_every_call(fixed, config_of(fixed), "mlp")


def test_count_rebuilds_counts_the_later_calls_that_compiled() -> None:
    spec = DataSpec((1, 28, 28), 10)
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 1, (40, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 40).astype(np.int64)
    for backend, rebuilt in ((CompilesPerValueBackend(), [2, 3]), (PassesLrAsDataBackend(), [])):
        config = config_of(backend)
        model = backend.build_model("mlp", spec, config)
        impl = backend.impl

        def probe(model: Any, impl: Any = impl) -> object:
            return len(impl.compiled)

        counted = count_rebuilds(backend, model, config, data, data, calls=3, probes=[probe])
        assert counted.seen and counted.rebuilt == rebuilt
        assert len(counted.train_seconds) == len(counted.evaluate_seconds) == 3
    plain = NumpyBackend()
    config = config_of(plain)
    counted = count_rebuilds(plain, plain.build_model("mlp", spec, config), config, data, data, probes=[])
    assert not counted.seen and counted.rebuilt == []


# -- 8. pickle under another name -------------------------------------------------------------------


class PickleImported(NumpyImplementation):
    """Saves with pickle and loads with ``from pickle import loads`` (bound before any guard runs)."""

    def save(self, model: NumpyModel, path: Path) -> None:
        path.write_bytes(dumps(model.weights))

    def load(self, model: NumpyModel, path: Path) -> NumpyModel:
        self.set_weights(model, loads(path.read_bytes()))
        return model


KEPT_UNPICKLER = pickle.Unpickler
"""A reference taken before the check runs, under no module attribute of pickle's names."""


class PickleKept(PickleImported):
    def load(self, model: NumpyModel, path: Path, unpickler: Any = KEPT_UNPICKLER) -> NumpyModel:
        weights: Weights = unpickler(io.BytesIO(path.read_bytes())).load()
        self.set_weights(model, weights)
        return model


class PickleImportedBackend(NumpyBackend):
    name = "pickles"
    implementation = f"{HERE}:PickleImported"


class PickleKeptBackend(NumpyBackend):
    name = "pickleskept"
    implementation = f"{HERE}:PickleKept"


@pytest.mark.parametrize("backend", [PickleImportedBackend(), PickleKeptBackend()], ids=str)
def test_pickle_under_another_name_is_caught(
    backend: NumpyBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AssertionError, match=r"load\(\) used pickle.*safetensors"):
        BackendConformance().test_save_load_gives_identical_predictions(
            backend, config_of(backend), "mlp", tmp_path, monkeypatch
        )
    assert pickle.loads(pickle.dumps([1.5])) == [1.5] and loads is pickle.loads, "the guard is undone"


def test_the_numpy_backend_passes_the_pickle_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = NumpyBackend()
    BackendConformance().test_save_load_gives_identical_predictions(
        backend, config_of(backend), "lenet", tmp_path, monkeypatch
    )


# -- 9. the tier declared and the tier tested ---------------------------------------------------------


class BasicOnly(NumpyBackend):
    name = "basiconly"
    conformance = "basic"


class NoSuchTier(NumpyBackend):
    name = "nosuchtier"
    conformance = "full"


def test_the_declared_tier_must_be_the_tier_tested() -> None:
    basic, mixable = BasicOnly(), NumpyBackend()
    with pytest.raises(AssertionError, match=r"declares conformance = 'basic' but its tests run the mixable tier"):
        BackendConformance().test_default_config_complete_and_typed(basic, config_of(basic))
    with pytest.raises(AssertionError, match=r"declares conformance = 'mixable' but its tests run the basic tier"):
        BasicConformance().test_default_config_complete_and_typed(mixable, config_of(mixable))
    BasicConformance().test_default_config_complete_and_typed(basic, config_of(basic))
    BackendConformance().test_default_config_complete_and_typed(mixable, config_of(mixable))


def test_an_unknown_tier_is_refused_and_shown_as_invalid() -> None:
    backend = NoSuchTier()
    with pytest.raises(AssertionError, match=r"conformance = 'full' is not a tier: declare 'basic' or 'mixable'"):
        BackendConformance().test_default_config_complete_and_typed(backend, config_of(backend))
    assert tier_text(backend) == "invalid: 'full' (use 'basic' or 'mixable')"
    assert tier_text(BasicOnly()) == "basic"


class OwnNames(NumpyImplementation):
    """Weights under the framework's own names: fine alone, not in a mixed federation."""

    def get_weights(self, model: NumpyModel) -> Weights:
        return {f"own.{key}": value for key, value in super().get_weights(model).items()}

    def set_weights(self, model: NumpyModel, weights: Weights) -> None:
        super().set_weights(model, {key: weights[f"own.{key}"] for key in model.weights})


class OwnNamesBackend(NumpyBackend):
    name = "ownnames"
    implementation = f"{HERE}:OwnNames"
    conformance = "basic"


@pytest.mark.parametrize("key", ["momentum", "weight-decay", "proximal-mu", "optimizer=adam"])
def test_the_basic_tier_needs_no_canonical_layout(key: str) -> None:
    backend = OwnNamesBackend()
    BasicConformance().test_optimizer_keys_honoured_or_declared(backend, config_of(backend), {}, key)
    BasicConformance().test_default_config_complete_and_typed(backend, config_of(backend))
    with pytest.raises(AssertionError, match="weights must be named and ordered"):
        BackendConformance().test_canonical_layout(backend, NumpyBackend(), config_of(backend), "mlp", SPEC)


def test_the_basic_tier_holds_no_check_of_mixing() -> None:
    basic = {name for name in dir(BasicConformance) if name.startswith("test_")}
    mixable = {name for name in dir(BackendConformance) if name.startswith("test_")}
    assert mixable - basic == {
        "test_canonical_layout",
        "test_same_predictions_as_numpy_reference",
        "test_odd_image_sizes_match_reference",
        "test_train_matches_reference",
    }
    assert not any(re.search(r"reference|canonical", name) for name in basic)
