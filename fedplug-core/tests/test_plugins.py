"""The hook contract and plugin discovery, with in-test plugins and a real installed distribution."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pluggy
import pytest

import fedplug
from fedplug import hookspecs
from fedplug.numpy_backend import NumpyBackend
from fedplug.plugins import (
    MESSAGE_LIMIT,
    Broken,
    Registry,
    UnknownBackend,
    build_registry,
    get_registry,
    implementation_problem,
    new_plugin_manager,
    one_line,
)
from fedplug.testing.runs import fedplug as fedplug_command

pytestmark = pytest.mark.fast


class Renamed(NumpyBackend):
    name = "renamed"
    description = "a second NumPy backend"


def registry_with(*plugins: object) -> Registry:
    """Discover like the CLI does, plus in-test plugin objects registered by hand."""
    return build_registry(*plugins)


def test_hookimpl_is_exported_at_top_level() -> None:
    assert fedplug.hookimpl is hookspecs.hookimpl
    assert isinstance(fedplug.hookimpl, pluggy.HookimplMarker)


def test_hook_names_carry_the_project_prefix() -> None:
    manager = new_plugin_manager()
    hooks = [name for name in dir(manager.hook) if not name.startswith("_")]
    assert hooks == ["fedplug_register_backends", "fedplug_register_strategies"]


def test_one_plugin_registers_several_backends() -> None:
    class Plugin:
        @fedplug.hookimpl
        def fedplug_register_backends(self, register):
            register(Renamed())

    registry = registry_with(Plugin())
    assert registry.backends["renamed"].distribution == "in-test"
    assert registry.backends["example_a"].distribution == "fedplug-testplugins"
    assert registry.backends["example_b"].plugin == "example"


def test_duplicate_name_is_a_clear_error_not_an_override() -> None:
    class Plugin:
        @fedplug.hookimpl
        def fedplug_register_backends(self, register):
            register(NumpyBackend())

    registry = registry_with(Plugin())
    assert registry.backends["numpy"].plugin == "fedplug.numpy_backend"
    reasons = [b.reason for b in registry.broken if b.plugin == "in-test-0"]
    assert reasons == [
        "backend 'numpy' is already registered by plugin 'fedplug.numpy_backend' (fedplug-core); uninstall one of them"
    ]


def test_builtin_numpy_backend_comes_through_the_same_hook() -> None:
    entry = get_registry().backends["numpy"]
    assert entry.plugin == "fedplug.numpy_backend"
    assert (entry.distribution, entry.version) == ("fedplug-core", fedplug.__version__)


def test_installed_distribution_is_discovered_with_name_and_version() -> None:
    done = fedplug_command("list", "--json")
    assert done.returncode == 0
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["example_a"]["distribution"] == "fedplug-testplugins"
    assert rows["example_a"]["version"] == "0.0.1"
    assert rows["example_a"]["framework_installed"] is True
    assert rows["numpy"]["status"] == "ok"


@pytest.mark.parametrize(
    ("plugin", "reason"),
    [
        ("badimport", "ModuleNotFoundError: No module named 'fedplug_framework_that_does_not_exist'"),
        ("raises", "RuntimeError: this plugin fails in its hook"),
        ("misspelled", "unknown hook 'fedplug_register_backend'"),
        ("malformed", "registered dict, not a fedplug.Backend instance"),
        ("duplicate", "backend 'numpy' is already registered by plugin 'fedplug.numpy_backend'"),
    ],
)
def test_broken_plugins_are_reported_and_the_rest_keep_working(plugin: str, reason: str) -> None:
    done = fedplug_command("list", "--json")
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows[plugin]["status"] == "broken"
    assert reason in rows[plugin]["reason"]
    assert any(line.startswith(f"fedplug: plugin '{plugin}'") and reason in line for line in done.stderr.splitlines())
    assert {"numpy", "example_a", "example_b"} <= {n for n, r in rows.items() if r["status"] == "ok"}


def test_list_table_shows_broken_rows() -> None:
    done = fedplug_command("list", env={"COLUMNS": "200"})
    assert done.returncode == 0
    assert "broken" in done.stdout and "example_a" in done.stdout


def test_fedplug_plugins_restricts_third_party_plugins() -> None:
    done = fedplug_command("list", "--json", env={"FEDPLUG_PLUGINS": "example"})
    names = {row["name"] for row in json.loads(done.stdout)}
    assert names == {"numpy", "example_a", "example_b"}
    assert done.stderr == ""


def test_empty_fedplug_plugins_loads_none() -> None:
    done = fedplug_command("list", "--json", env={"FEDPLUG_PLUGINS": ""})
    assert [row["name"] for row in json.loads(done.stdout)] == ["numpy"]


def test_fedplug_plugins_accepts_distribution_names() -> None:
    done = fedplug_command("list", "--json", env={"FEDPLUG_PLUGINS": "fedplug-testplugins"})
    names = {row["name"] for row in json.loads(done.stdout)}
    assert {"example_a", "badimport"} <= names


def test_strict_mode_reraises_plugin_errors() -> None:
    done = fedplug_command("list", env={"FEDPLUG_STRICT": "1", "FEDPLUG_PLUGINS": "badimport"})
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr and "Traceback" in done.stderr


MISBEHAVE = {"FEDPLUG_TESTPLUGINS_MISBEHAVE": "1"}


@pytest.mark.parametrize(
    ("plugin", "reason"),
    [
        ("exits", "SystemExit: the plugin called sys.exit(3)"),
        ("interrupts", "KeyboardInterrupt"),
        ("hookexits", "SystemExit: the plugin called sys.exit(0)"),
        ("baseexception", "PluginAbort: this plugin aborts in its hook"),
    ],
)
def test_plugin_that_exits_or_interrupts_is_reported_and_the_command_goes_on(plugin: str, reason: str) -> None:
    done = fedplug_command("list", "--json", env={**MISBEHAVE, "FEDPLUG_PLUGINS": f"{plugin},example"})
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows[plugin] == {"name": plugin, "status": "broken", "distribution": "fedplug-testplugins", "reason": reason}
    assert {"numpy", "example_a", "example_b"} <= {n for n, r in rows.items() if r["status"] == "ok"}
    assert done.stderr.splitlines() == [f"fedplug: plugin '{plugin}' (fedplug-testplugins) is broken: {reason}"]


def test_every_command_survives_all_misbehaving_plugins_at_once() -> None:
    env = {**MISBEHAVE, "FEDPLUG_PLUGINS": "exits,interrupts,hookexits,baseexception,prints", "COLUMNS": "200"}
    done = fedplug_command("info", "numpy", env=env)
    assert done.returncode == 0, done.stderr
    assert "models: mlp, lenet" in done.stdout
    assert "Traceback" not in done.stderr
    assert sum("is broken" in line for line in done.stderr.splitlines()) == 4


def test_plugin_output_never_corrupts_list_json() -> None:
    done = fedplug_command("list", "--json", env={**MISBEHAVE, "FEDPLUG_PLUGINS": "prints"})
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}  # stdout is nothing but the JSON
    assert rows["printing"]["status"] == "ok"
    for said in ("hello from the prints plugin at import", "raw bytes from the prints plugin", "prints plugin's hook"):
        assert said in done.stderr, "what a plugin prints goes to stderr, not lost"


def test_discovery_works_from_a_source_tree_without_core_metadata() -> None:
    """fedplug-core run from its source folder (no installed metadata) still lists its built-in backend."""
    code = """
import importlib.metadata as md
real = md.Distribution.from_name.__func__
def from_name(cls, name):
    if name.replace("_", "-") == "fedplug-core":
        raise md.PackageNotFoundError(name)
    return real(cls, name)
md.Distribution.from_name = classmethod(from_name)
from fedplug.plugins import get_registry
entry = get_registry().backends["numpy"]
print(entry.distribution, entry.version)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "FEDPLUG_PLUGINS": ""}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fedplug-core", "0.0.0"]


class Hooked:
    """An in-test plugin registering one backend."""

    def __init__(self, backend: object) -> None:
        self.backend = backend

    @fedplug.hookimpl
    def fedplug_register_backends(self, register) -> None:
        register(self.backend)


def with_implementation(text: str) -> object:
    return type("Implemented", (NumpyBackend,), {"name": "implemented", "implementation": text})()


@pytest.mark.parametrize(
    ("implementation", "reason"),
    [
        ("fedplug.numpy_backend.NumpyImplementation", "must be 'module:Class'"),
        ("fedplug.numpy_backend:", "must be 'module:Class'"),
        ("", "must be 'module:Class' (e.g. 'fedplug_mything.impl:MythingImplementation'), got ''"),
        ("fedplug numpy:Impl", "must be 'module:Class'"),
        ("fedplug.numpy_backend:Numpy.Implementation", "must be 'module:Class'"),
        ("fedplug.no_such_module:Impl", "names module 'fedplug.no_such_module', which is not installed"),
        ("fedplug_no_such_package.impl:Impl", "names module 'fedplug_no_such_package.impl', which is not installed"),
    ],
)
def test_malformed_implementation_is_refused_at_registration(implementation: str, reason: str) -> None:
    """Not at the first operation, after Ray started: ``fedplug list`` shows the plugin broken and says why."""
    registry = registry_with(Hooked(with_implementation(implementation)))
    assert "implemented" not in registry.backends
    (broken,) = [b for b in registry.broken if b.plugin == "in-test-0"]
    assert broken.reason.startswith("backend 'implemented': implementation ")
    assert reason in broken.reason


def test_wellformed_implementation_is_found_without_importing_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "fedplug_heavy_impl.py").write_text("raise RuntimeError('imports the framework')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = with_implementation("fedplug_heavy_impl:HeavyImplementation")
    registry = registry_with(Hooked(backend))
    assert registry.backends["implemented"].backend is backend
    assert "fedplug_heavy_impl" not in sys.modules, "registration imported the implementation's module"


def test_checking_an_implementation_imports_no_package(tmp_path, monkeypatch) -> None:
    """A package above the implementation that is not imported yet stays so: it may import the framework."""
    (tmp_path / "fedplug_heavy_pkg").mkdir()
    (tmp_path / "fedplug_heavy_pkg" / "__init__.py").write_text("import os\nos.environ['FEDPLUG_HEAVY'] = '1'\n")
    (tmp_path / "fedplug_heavy_pkg" / "impl.py").write_text("class HeavyImplementation: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("FEDPLUG_HEAVY", raising=False)
    assert implementation_problem(with_implementation("fedplug_heavy_pkg.impl:HeavyImplementation")) is None
    assert "FEDPLUG_HEAVY" not in os.environ and "fedplug_heavy_pkg" not in sys.modules, "a package was imported"
    missing = implementation_problem(with_implementation("fedplug_absent_pkg.impl:Impl"))
    assert missing is not None and "names module 'fedplug_absent_pkg.impl', which is not installed" in missing


def test_a_backend_of_the_old_contract_needs_no_implementation() -> None:
    from fedplug.backend import OPERATIONS

    methods = {op: lambda self, *args: None for op in OPERATIONS}  # the 0.1 contract: operations on the class
    legacy = type("Legacy", (NumpyBackend,), {"name": "legacy_ops", "implementation": "", **methods})()
    assert implementation_problem(legacy) is None


def test_a_broken_plugin_is_named_when_its_backend_is_asked_for() -> None:
    registry = Registry(
        broken=[Broken("torch", "fedplug-torch", "ImportError: libtorch_cpu.so: cannot open shared object file")]
    )
    for name in ("torch", "pytorch", "Torch"):
        with pytest.raises(UnknownBackend) as raised:
            registry.get(name)
        message = str(raised.value)
        assert "its plugin 'torch' (fedplug-torch) is broken: ImportError: libtorch_cpu.so" in message
        assert "pip install --force-reinstall fedplug-torch" in message
        assert "to add it" not in message
    with pytest.raises(UnknownBackend, match="to add it: pip install fedplug-jax"):
        registry.get("jax")


def test_plugin_messages_are_one_printable_capped_line() -> None:
    reason = "ValueError: " + "\n".join(f"line {i} \x00\x1b[31m" for i in range(200))
    registry = Registry(broken=[Broken("mything", "fedplug-mything", one_line(reason))])
    with pytest.raises(UnknownBackend) as raised:
        registry.get("mything")
    message = str(raised.value)
    assert len(message) <= MESSAGE_LIMIT and "\n" not in message and "\x00" not in message and "\x1b" not in message
    assert "line 0 \\x00\\x1b[31m line 1" in message
    assert one_line("a" * 1000) == "a" * (MESSAGE_LIMIT - 3) + "..."
    assert one_line("short\tand\r\nplain ") == "short and plain"


def test_a_plugin_failing_with_a_huge_message_gets_one_capped_line(capsys: pytest.CaptureFixture[str]) -> None:
    class Huge:
        @fedplug.hookimpl
        def fedplug_register_backends(self, register) -> None:
            raise RuntimeError("x" * 5000 + "\n" + "y" * 5000)

    registry = registry_with(Huge())
    (broken,) = [b for b in registry.broken if b.plugin == "in-test-0"]
    assert broken.reason.startswith("RuntimeError: xxx") and broken.reason.endswith("...")
    line = next(line for line in capsys.readouterr().err.splitlines() if "in-test-0" in line)
    assert len(line) <= MESSAGE_LIMIT


def test_many_installed_backends_leave_the_hint_whole() -> None:
    """The list of installed backends is cut, not the hint after it."""
    many = [type(f"B{i}", (NumpyBackend,), {"name": f"backend_{i:02d}"})() for i in range(40)]
    registry = registry_with(*(Hooked(backend) for backend in many))
    with pytest.raises(UnknownBackend) as raised:
        registry.get("backend_3O")  # a letter O for a zero
    message = str(raised.value)
    assert f"backend_11, ... ({len(registry.backends)} in all)); did you mean 'backend_39' or" in message
    assert len(message) <= MESSAGE_LIMIT
