"""The hook contract and plugin discovery, with in-test plugins and a real installed distribution."""

from __future__ import annotations

import json

import pluggy
import pytest

import fedplug
from conftest import fedplug as fedplug_command
from fedplug import hookspecs
from fedplug.numpy_backend import NumpyBackend
from fedplug.plugins import Registry, collect_backends, get_registry, load_plugins, new_plugin_manager

pytestmark = pytest.mark.fast


class Renamed(NumpyBackend):
    name = "renamed"
    description = "a second NumPy backend"


def registry_with(*plugins: object) -> Registry:
    """Discover like the CLI does, plus in-test plugin objects registered by hand."""
    manager = new_plugin_manager()
    registry = Registry()
    origins = load_plugins(manager, registry)
    for i, plugin in enumerate(plugins):
        manager.register(plugin, name=f"in-test-{i}")
        origins[f"in-test-{i}"] = ("in-test", "0")
    try:
        collect_backends(manager, registry, origins)
    finally:
        for i in range(len(plugins)):
            manager.unregister(name=f"in-test-{i}")
    return registry


def test_hookimpl_is_exported_at_top_level() -> None:
    assert fedplug.hookimpl is hookspecs.hookimpl
    assert isinstance(fedplug.hookimpl, pluggy.HookimplMarker)


def test_hook_names_carry_the_project_prefix() -> None:
    manager = new_plugin_manager()
    hooks = [name for name in dir(manager.hook) if not name.startswith("_")]
    assert hooks == ["fedplug_register_backends"]


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
