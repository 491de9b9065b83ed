"""The backend contract's core pieces: framework versions, lazy implementations, refusals, deprecation."""

from __future__ import annotations

import platform
import sys
import warnings
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

import fedplug
from fedplug.backend import OPERATIONS, BackendUnavailable, Config, Scalar, require_available
from fedplug.config import ConfigError, check_for_backend, check_supported, resolve
from fedplug.numpy_backend import NumpyBackend

pytestmark = pytest.mark.fast


def test_framework_versions_are_checked_against_the_requirement() -> None:
    assert fedplug.Framework("numpy", "numpy>=1.26").problem() is None
    found = np.__version__
    assert fedplug.Framework("numpy", "numpy<1").problem() == (
        f"needs numpy<1, found numpy {found}: pip install -U 'numpy<1'"
    )
    assert fedplug.Framework("no_such_framework_x", "no-such-framework-x>=1").problem() == (
        "needs no_such_framework_x: pip install 'no-such-framework-x>=1'"
    )


def test_check_available_says_which_version_is_needed() -> None:
    class OldNumpy(NumpyBackend):
        name = "old_numpy"
        framework = fedplug.Framework("numpy", "numpy>=99")

    with pytest.raises(BackendUnavailable, match=r"backend 'old_numpy' needs numpy>=99, found numpy .*pip install -U"):
        OldNumpy().check_available()


def test_the_implementation_is_imported_on_first_use_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lazy_impl_probe.py").write_text(
        "from fedplug.numpy_backend import NumpyImplementation\nclass Impl(NumpyImplementation):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    class Lazy(NumpyBackend):
        name = "lazy"
        implementation = "lazy_impl_probe:Impl"

    backend = Lazy()
    assert "lazy_impl_probe" not in sys.modules
    model = backend.build_model("mlp", fedplug.DataSpec((1, 4, 4), 2), resolve(NumpyBackend(), {}))
    assert "lazy_impl_probe" in sys.modules and type(backend.impl).__name__ == "Impl"
    assert backend.impl.backend is backend and set(backend.get_weights(model)) == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    }


def test_an_installed_framework_that_fails_to_import_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "native_framework_probe.py").write_text(
        "raise OSError('libnative.so: cannot open shared object file')\n"
    )
    (tmp_path / "native_impl_probe.py").write_text("import native_framework_probe\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class NativeFails(NumpyBackend):
        name = "native_fails"
        framework = fedplug.Framework("native_framework_probe", "native-framework-probe>=1")
        implementation = "native_impl_probe:Impl"

    with pytest.raises(BackendUnavailable) as caught:
        _ = NativeFails().impl
    assert str(caught.value) == (
        "backend 'native_fails': native_framework_probe is installed but fails to import "
        "(OSError: libnative.so: cannot open shared object file): "
        "pip install --force-reinstall 'native-framework-probe>=1'"
    )


def test_a_bug_in_the_backends_own_module_is_not_blamed_on_the_framework(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "own_bug_probe.py").write_text("import own_bug_probe_helper_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class Buggy(NumpyBackend):
        name = "buggy"
        implementation = "own_bug_probe:Impl"

    with pytest.raises(ModuleNotFoundError, match="own_bug_probe_helper_missing"):
        _ = Buggy().impl


def test_unsupported_keys_are_refused_in_one_line() -> None:
    class NoProx(NumpyBackend):
        name = "noprox"
        unsupported = frozenset({"proximal-mu", "momentum"})

    backend = NoProx()
    config = resolve(NumpyBackend(), {})
    check_supported(backend, {**config, "strategy": "fedavg"})  # momentum 0: nothing needs it
    with pytest.raises(ConfigError, match="backend 'noprox' does not apply FedProx's proximal term"):
        resolve(backend, {"strategy": "fedprox"})
    with pytest.raises(ConfigError, match="backend 'noprox' does not support run-config 'momentum'"):
        resolve(backend, {"momentum": 0.9})


def test_an_unsupported_choice_refuses_that_value_only() -> None:
    class NoAdam(NumpyBackend):
        name = "noadam"
        unsupported = frozenset({"optimizer=adam"})

    backend = NoAdam()
    assert resolve(backend, {"optimizer": "sgd", "momentum": 0.9})["optimizer"] == "sgd"
    with pytest.raises(ConfigError, match=r"^backend 'noadam' does not support optimizer=adam: choose another"):
        resolve(backend, {"optimizer": "adam"})


def test_a_backend_s_own_keys_live_in_its_namespace_and_are_checked_per_backend() -> None:
    class Owner(NumpyBackend):
        name = "owner"
        defaults: ClassVar[Mapping[str, Scalar]] = {**NumpyBackend.defaults, "owner.flavour": "plain"}

        def check_config(self, config: Config) -> None:
            if config["owner.flavour"] not in ("plain", "fancy"):
                raise ConfigError("run-config 'owner.flavour' must be plain or fancy")

    owner, numpy = Owner(), NumpyBackend()
    assert resolve(owner, {"owner.flavour": "fancy"})["owner.flavour"] == "fancy"
    with pytest.raises(ConfigError, match=r"owner\.flavour' must be plain or fancy"):
        resolve(owner, {"owner.flavour": "odd"})
    with pytest.raises(ConfigError, match=r"unknown run-config key 'owner\.flavor'; did you mean 'owner\.flavour'"):
        resolve(owner, {"owner.flavor": "fancy"})
    with pytest.raises(ConfigError, match=r"run-config 'owner\.flavour' must be str"):
        resolve(owner, {"owner.flavour": 3})
    # a numpy server with owner nodes: the owner's keys join the config, checked against the owner
    mixed = resolve(numpy, {"owner.flavour": "fancy"}, others=[owner])
    assert mixed["owner.flavour"] == "fancy" and mixed["backend"] == "numpy"
    assert resolve(numpy, {}, others=[owner])["owner.flavour"] == "plain"
    with pytest.raises(ConfigError, match="must be plain or fancy"):
        resolve(numpy, {"owner.flavour": "odd"}, others=[owner])
    with pytest.raises(ConfigError, match=r"unknown run-config key 'owner\.flavour'"):
        resolve(numpy, {"owner.flavour": "fancy"})  # no owner node takes part
    # the per-backend check on a resolved config
    check_for_backend(owner, mixed)
    with pytest.raises(ConfigError, match=r"backend 'owner' has no run-config key 'owner\.colour'"):
        check_for_backend(owner, {**mixed, "owner.colour": "red"})
    with pytest.raises(ConfigError, match="backend 'owner' has no model 'cnn'"):
        check_for_backend(owner, {**mixed, "model": "cnn"})


def test_a_class_defining_every_operation_itself_gets_one_deprecation_warning_naming_the_removal() -> None:
    def old_style() -> type:
        class OldStyle(NumpyBackend):  # as fedplug 0.1's new-backend generated it
            name = "old_style"
            build_model = NumpyBackend.build_model
            get_weights = NumpyBackend.get_weights
            set_weights = NumpyBackend.set_weights
            train = NumpyBackend.train
            evaluate = NumpyBackend.evaluate
            predict = NumpyBackend.predict
            save = NumpyBackend.save
            load = NumpyBackend.load

        return OldStyle

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class Wrapper(NumpyBackend):  # a test double overriding one operation: fine
            name = "wrapper"
            train = NumpyBackend.train

        assert old_style() is not old_style()  # the same class statement twice: said once
    assert [type(w.message) for w in caught] == [DeprecationWarning], [str(w.message) for w in caught]
    message, where = str(caught[0].message), f"{__name__}.{old_style.__qualname__}.<locals>.OldStyle"
    assert message.startswith(f"{where} defines the operations itself")
    assert "removed in fedplug 0.3" in message and "fedplug.Implementation subclass" in message
    assert caught[0].filename == __file__  # it points at the class statement, not at fedplug
    assert set(OPERATIONS) <= set(vars(old_style()))


def test_a_malformed_framework_requirement_is_a_problem_not_trusted() -> None:
    problem = fedplug.Framework("numpy", "numpy>=>1").problem()
    assert problem is not None and problem.startswith("declares a malformed requirement 'numpy>=>1'")


def test_a_framework_checks_every_requirement_it_carries() -> None:
    both = fedplug.Framework("numpy", "numpy>=1.26", also=(("packaging", "packaging>=20"),))
    assert both.problem() is None
    assert fedplug.Framework("numpy", "numpy>=1.26", also=(("packaging", "packaging<1"),)).problem() == (
        f"needs packaging<1, found packaging {version('packaging')}: pip install -U 'packaging<1'"
    )
    missing = fedplug.Framework("numpy", "numpy", also=(("no_such_helper_x", "no-such-helper-x"),), hint="pip go")
    assert missing.problem() == "needs no_such_helper_x: pip go"


@pytest.mark.parametrize(
    ("system", "machine", "ok"),
    [("Linux", "x86_64", True), ("Darwin", "arm64", True), ("Darwin", "x86_64", False), ("Windows", "AMD64", False)],
)
def test_a_framework_checks_its_platforms(monkeypatch: pytest.MonkeyPatch, system: str, machine: str, ok: bool) -> None:
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    framework = fedplug.Framework("numpy", "numpy", platforms=("Darwin/arm64", "Linux"))
    if ok:
        assert framework.problem() is None
        return
    assert framework.problem() == (
        f"cannot run here: numpy runs on Apple silicon Macs and Linux, not on {system} {machine.lower()}; "
        "use another backend (fedplug list)"
    )
    assert fedplug.Framework("numpy", "numpy").problem() is None  # no platforms: any


def test_backend_itself_is_a_base_class_not_a_backend() -> None:
    with pytest.raises(TypeError, match=r"fedplug\.Backend is a base class: subclass it"):
        fedplug.Backend()
    assert NumpyBackend().name == "numpy"


def test_availability_takes_the_run_config_and_serves_overrides_without_it() -> None:
    seen: list[object] = []

    class WithConfig(NumpyBackend):
        name = "with_config"

        def check_available(self, config: Config | None = None) -> None:
            seen.append(config)

    class Legacy(NumpyBackend):  # an override written for fedplug 0.1: no config parameter
        name = "legacy_check"

        def check_available(self) -> None:
            seen.append("legacy")

    config = resolve(NumpyBackend(), {})
    require_available(WithConfig(), config)
    require_available(WithConfig())
    require_available(Legacy(), config)
    assert seen == [config, None, "legacy"]
    NumpyBackend().check_available(config)  # the default takes it too
