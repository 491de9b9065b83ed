"""Backend and strategy discovery: pluggy over the ``fedplug`` entry-point group, one plugin failing alone."""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any

import pluggy

from fedplug import hookspecs
from fedplug.backend import OPERATIONS, Backend, Framework
from fedplug.errors import MESSAGE_LIMIT, one_line
from fedplug.strategy_contract import CAPABILITIES, COMPOSES, SAMPLING_PARAMETERS, Parameter, Strategy
from fedplug.version import __version__

ENTRY_POINT_GROUP = "fedplug"
DEFAULT_PLUGINS = ("fedplug.numpy_backend", "fedplug.builtin_strategies")
"""Built-in plugins (the numpy backend, Flower's twelve strategies): registered like any other, always loaded."""
PLUGINS_ENV = "FEDPLUG_PLUGINS"
"""Comma list of third-party plugin (entry point or distribution) names to load; empty loads none."""
STRICT_ENV = "FEDPLUG_STRICT"
"""Set to 1 to re-raise plugin errors instead of reporting them (for plugin authors)."""
KNOWN_BACKENDS = {
    "numpy": "numpy",
    "torch": "torch",
    "pytorch": "torch",
    "keras": "keras",
    "tensorflow": "keras",
    "tf": "keras",
    "jax": "jax",
    "flax": "jax",
    "mlx": "mlx",
    "mxnet": "mxnet",
}
"""Names users type for the backends of the fedplug project, and the backend each means."""


class UnknownBackend(LookupError):
    """No installed backend has this name."""


class UnknownStrategy(LookupError):
    """No installed strategy has this name."""


class PluginProblem(ValueError):
    """A plugin registered something the core cannot use."""


@dataclass(frozen=True)
class Registered:
    """A backend with the plugin and distribution that registered it."""

    backend: Backend
    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class Broken:
    """A plugin, or one backend of it, that could not be loaded."""

    plugin: str
    distribution: str
    reason: str


@dataclass(frozen=True)
class RegisteredStrategy:
    """A strategy with the plugin and distribution that registered it."""

    strategy: Strategy
    plugin: str
    distribution: str
    version: str


@dataclass
class Registry:
    """The backends and strategies of this environment by name, and the plugins that failed to load."""

    backends: dict[str, Registered] = field(default_factory=dict)
    broken: list[Broken] = field(default_factory=list)
    strategies: dict[str, RegisteredStrategy] = field(default_factory=dict)

    def get_strategy(self, name: str) -> Strategy:
        """The strategy called ``name``, or ``UnknownStrategy`` with what to do (one line)."""
        if name in self.strategies:
            return self.strategies[name].strategy
        broken = next((b for b in self.broken if b.plugin.lower() == name.lower()), None)
        if broken is not None:
            raise UnknownStrategy(
                one_line(
                    f"strategy '{name}' cannot be used: its plugin '{broken.plugin}' ({broken.distribution}) is "
                    f"broken: {one_line(broken.reason, 150)}; reinstall it or report this to its authors"
                )
            )
        close = difflib.get_close_matches(name.lower(), list(self.strategies), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownStrategy(
            one_line(f"unknown strategy '{one_line(name, 60)}'; choose one of: {', '.join(self.strategies)}{hint}")
        )

    def get(self, name: str) -> Backend:
        """The backend called ``name``, or ``UnknownBackend`` with what to do (one line)."""
        if name in self.backends:
            return self.backends[name].backend
        broken = self.broken_for(name)
        if broken is not None:
            raise UnknownBackend(
                one_line(
                    f"backend '{name}' cannot be used: its plugin '{broken.plugin}' ({broken.distribution}) is broken: "
                    f"{one_line(broken.reason, 150)}; reinstall it (pip install --force-reinstall "
                    f"{broken.distribution}) or report this to its authors"
                )
            )
        names = sorted(self.backends)
        installed = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "") or "none"
        close = difflib.get_close_matches(name, list(self.backends), n=3)
        if close:
            hint = f"did you mean {' or '.join(repr(c) for c in close)}?"
        else:
            known = KNOWN_BACKENDS.get(name.lower()) or next(
                iter(difflib.get_close_matches(name.lower(), list(KNOWN_BACKENDS), n=1)), None
            )
            meant = KNOWN_BACKENDS.get(known or "", name)
            if meant in self.backends:
                hint = f"did you mean '{meant}'?"
            elif meant != name:
                hint = f"did you mean '{meant}'? to add it: pip install fedplug-{meant}"
            else:
                hint = f"to add it: pip install fedplug-{name}"
        raise UnknownBackend(one_line(f"unknown backend '{one_line(name, 60)}' (installed: {installed}); {hint}"))

    def broken_for(self, name: str) -> Broken | None:
        """The broken plugin that would have registered backend ``name``, by its entry point or distribution.

        A broken plugin registered no backend, so its backends' names are unknown: ``name`` is matched
        against the plugin's entry-point name and against its distribution ``fedplug-NAME``, the names
        fedplug's own backends use (``pytorch`` means ``torch``).
        """
        meant = KNOWN_BACKENDS.get(name.lower(), name)
        wanted = {name.lower(), meant.lower()}
        for broken in self.broken:
            dist = broken.distribution.lower().replace("_", "-")
            if broken.plugin.lower() in wanted or dist in {f"fedplug-{w.replace('_', '-')}" for w in wanted}:
                return broken
        return None


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0", "false")


def _selected(name: str, distribution: str) -> bool:
    wanted = os.environ.get(PLUGINS_ENV)
    if wanted is None:
        return True
    names = {part.strip() for part in wanted.split(",") if part.strip()}
    return name in names or distribution in names


def problem_with(backend: object) -> str | None:
    """Why ``backend`` is not a well-formed backend, or None."""
    if isinstance(backend, type) and issubclass(backend, Backend):
        name = backend.__name__
        return f"registered the class {name}, not a fedplug.Backend instance: register({name}())"
    if not isinstance(backend, Backend):
        return f"registered {type(backend).__name__}, not a fedplug.Backend instance"
    for attr, kind in (("name", str), ("description", str), ("file_suffix", str)):
        if not isinstance(getattr(backend, attr, None), kind):
            return f"backend attribute '{attr}' must be a {kind.__name__}"
    if not backend.name.isidentifier():
        return f"backend name '{backend.name}' is not a valid Python identifier"
    if not isinstance(getattr(backend, "framework", None), Framework):
        return "backend attribute 'framework' must be a fedplug.Framework"
    missing = {"mlp", "lenet"} - set(backend.models)
    if missing:
        return f"backend '{backend.name}' must build the shared models {sorted(missing)}"
    return implementation_problem(backend)


def _parameter_problem(where: str, param: object) -> str | None:
    if not isinstance(param, Parameter):
        return f"{where}: parameters must be fedplug.Parameter instances, got {type(param).__name__}"
    if not (isinstance(param.name, str) and param.name.replace("-", "_").isidentifier() and param.name.islower()):
        return f"{where}: parameter name {param.name!r} must be lowercase kebab-case, e.g. 'server-lr'"
    if not isinstance(param.default, bool | int | float | str):
        return f"{where}: parameter '{param.name}' has a default of type {type(param.default).__name__}"
    if param.name in {p.name for p in SAMPLING_PARAMETERS}:
        return f"{where}: parameter '{param.name}' is a sampling parameter fedplug applies itself: remove it"
    problem = param.problem(param.default)
    return f"{where}: parameter '{param.name}' default {problem}" if problem else None


def strategy_problem(strategy: object) -> str | None:
    """Why ``strategy`` is not a well-formed strategy descriptor, or None (nothing is imported)."""
    if isinstance(strategy, type) and issubclass(strategy, Strategy):
        name = strategy.__name__
        return f"registered the class {name}, not a fedplug.Strategy instance: register({name}())"
    if not isinstance(strategy, Strategy):
        return f"registered {type(strategy).__name__}, not a fedplug.Strategy instance"
    for attr in ("name", "description", "implementation"):
        if not isinstance(getattr(strategy, attr, None), str) or not getattr(strategy, attr):
            return f"strategy attribute '{attr}' must be a non-empty str"
    where = f"strategy '{strategy.name}'"
    if not strategy.name.isidentifier():
        return f"strategy name '{strategy.name}' is not a valid Python identifier"
    module, colon, class_name = strategy.implementation.partition(":")
    if not colon or not class_name.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        return one_line(f"{where}: implementation must be 'module:Class', got {strategy.implementation!r}")
    if not isinstance(strategy.parameters, tuple):
        return f"{where}: parameters must be a tuple of fedplug.Parameter"
    for param in strategy.parameters:
        problem = _parameter_problem(where, param)
        if problem:
            return problem
    unknown = set(strategy.needs) - set(CAPABILITIES)
    if not isinstance(strategy.needs, frozenset) or unknown:
        return f"{where}: needs must be a frozenset of {', '.join(CAPABILITIES)}; unknown: {sorted(unknown)}"
    unknown = set(strategy.composes) - set(COMPOSES)
    if not isinstance(strategy.composes, frozenset) or unknown:
        return f"{where}: composes must be a frozenset of {', '.join(COMPOSES)}; unknown: {sorted(unknown)}"
    if strategy.needs and not (isinstance(strategy.node_step, str) and strategy.node_step.count(":") == 1):
        return f"{where} needs {sorted(strategy.needs)}: name its node-side function in node_step = 'module:function'"
    if "reply-arrays" in strategy.needs and not strategy.reply_records:
        return f"{where} needs reply-arrays: name the extra ArrayRecords of a train reply in reply_records"
    if strategy.reply_records and "reply-arrays" not in strategy.needs:
        return f"{where} names reply_records but does not declare needs = frozenset({{'reply-arrays'}})"
    if strategy.state is None:
        return (
            f"{where} declares no checkpoint state: set state = () if it keeps nothing across rounds, "
            "else the names of the attributes that change from round to round"
        )
    if not isinstance(strategy.state, tuple) or not all(isinstance(a, str) for a in strategy.state):
        return f"{where}: state must be a tuple of attribute names"
    return None


def implementation_problem(backend: Backend) -> str | None:
    """Why ``backend.implementation`` cannot name its ``Implementation``, found without importing it, or None.

    It must be ``"module:Class"`` of Python names, and ``module`` must be installed: its top-level
    package is looked up with ``importlib.util.find_spec`` (which imports nothing), and the module
    itself when the package above it is imported already (the plugin's own, as a rule). Nothing is
    imported here: the implementation's module imports the framework. A backend that defines every
    operation itself (fedplug 0.1's contract) needs none.
    """
    cls = type(backend)
    if all(getattr(cls, operation) is not getattr(Backend, operation) for operation in OPERATIONS):
        return None
    text = backend.implementation
    where = f"backend '{backend.name}': implementation"
    if not isinstance(text, str):
        return f"{where} must be a str 'module:Class', got {type(text).__name__}"
    module, colon, class_name = text.partition(":")
    if not colon or not class_name.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        example = "'fedplug_mything.impl:MythingImplementation'"
        return one_line(f"{where} must be 'module:Class' (e.g. {example}), got {text!r}")
    parent = module.rpartition(".")[0]
    looked_up = module if not parent or parent in sys.modules else module.partition(".")[0]
    try:
        found = importlib.util.find_spec(looked_up) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return one_line(f"{where} names module '{module}', which is not installed ({text!r})")
    return None


def new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what plugins print to stderr, so that ``fedplug list --json`` stays pure JSON.

    Both Python's ``sys.stdout`` and file descriptor 1 are redirected: extension modules
    print to the descriptor directly.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1: redirect Python's stream only
        saved = -1
    try:
        if saved >= 0:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved >= 0:
            os.dup2(saved, 1)
            os.close(saved)


def _fail(registry: Registry, plugin: str, distribution: str, error: BaseException) -> None:
    if _strict():
        raise error
    if isinstance(error, PluginProblem):
        reason = str(error)
    elif isinstance(error, SystemExit):
        reason = f"SystemExit: the plugin called sys.exit({error.code!r})"
    else:
        reason = f"{type(error).__name__}: {error}".rstrip(": ")
    reason = one_line(reason, MESSAGE_LIMIT - 60)  # the line below adds the plugin's names
    registry.broken.append(Broken(plugin, distribution, reason))
    if not os.environ.get("FEDPLUG_QUIET_PLUGINS"):
        print(f"fedplug: plugin '{plugin}' ({distribution}) is broken: {reason}", file=sys.stderr)


def load_plugins(manager: pluggy.PluginManager, registry: Registry) -> dict[str, tuple[str, str]]:
    """Register the built-in and installed plugins; return plugin -> (distribution, version)."""
    origins: dict[str, tuple[str, str]] = {}
    core = ("fedplug-core", __version__)  # also right in a source tree, without metadata
    candidates: list[tuple[str, str, str, object]] = [(module, *core, module) for module in DEFAULT_PLUGINS]
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = point.dist
        dist_name, dist_version = (dist.name, dist.version) if dist else ("?", "?")
        if _selected(point.name, dist_name):
            candidates.append((point.name, dist_name, dist_version, point))
    for name, dist_name, dist_version, source in candidates:
        if manager.has_plugin(name):
            continue
        try:
            module = importlib.import_module(source) if isinstance(source, str) else source.load()  # type: ignore[attr-defined]
            manager.register(module, name=name)
        except BaseException as error:  # SystemExit, KeyboardInterrupt: a plugin must not end the command
            _fail(registry, name, dist_name, error)
            continue
        try:
            manager.check_pending()
        except pluggy.PluginValidationError as error:
            manager.unregister(name=name)
            _fail(registry, name, dist_name, error)
            continue
        origins[name] = (dist_name, dist_version)
    return origins


def _collect(
    kind: str,
    manager: pluggy.PluginManager,
    registry: Registry,
    origins: dict[str, tuple[str, str]],
) -> None:
    """Call each plugin's hook for ``kind`` on its own, so a failing plugin is reported and skipped."""
    table: dict[str, Any] = registry.backends if kind == "backend" else registry.strategies
    check, entry = (problem_with, Registered) if kind == "backend" else (strategy_problem, RegisteredStrategy)
    caller = manager.hook.fedplug_register_backends if kind == "backend" else manager.hook.fedplug_register_strategies
    for impl in caller.get_hookimpls():  # registration order: built-ins first
        dist_name, dist_version = origins.get(impl.plugin_name, ("?", "?"))
        found: list[object] = []
        try:
            impl.function(register=found.append)
        except BaseException as error:  # SystemExit, KeyboardInterrupt: a plugin must not end the command
            _fail(registry, impl.plugin_name, dist_name, error)
            continue
        for item in found:
            try:
                problem = check(item)
            except Exception as error:  # e.g. a property of the descriptor that raises
                problem = f"{kind} object is unusable: {type(error).__name__}: {error}"
            name = getattr(item, "name", "?")
            if problem is None and name in table:
                first = table[name]
                problem = (
                    f"{kind} '{name}' is already registered by plugin '{first.plugin}' "
                    f"({first.distribution}); uninstall one of them"
                )
            if problem:
                _fail(registry, impl.plugin_name, dist_name, PluginProblem(problem))
                continue
            table[name] = entry(item, impl.plugin_name, dist_name, dist_version)  # type: ignore[arg-type]


def collect_backends(manager: pluggy.PluginManager, registry: Registry, origins: dict[str, tuple[str, str]]) -> None:
    """Call each plugin's backend hook on its own, so a failing plugin is reported and skipped."""
    _collect("backend", manager, registry, origins)


def collect_strategies(manager: pluggy.PluginManager, registry: Registry, origins: dict[str, tuple[str, str]]) -> None:
    """Call each plugin's strategy hook on its own, so a failing plugin is reported and skipped."""
    _collect("strategy", manager, registry, origins)


def build_registry(*extra: object) -> Registry:
    """Discover the installed plugins, plus ``extra`` plugin objects (for tests), and collect what they register."""
    registry = Registry()
    manager = new_plugin_manager()
    with stdout_to_stderr():  # plugins run code at import and in their hook
        origins = load_plugins(manager, registry)
        for i, plugin in enumerate(extra):
            manager.register(plugin, name=f"in-test-{i}")
            origins[f"in-test-{i}"] = ("in-test", "0")
        collect_backends(manager, registry, origins)
        collect_strategies(manager, registry, origins)
    return registry


@cache
def get_registry() -> Registry:
    """All backends and strategies of this environment, discovered once per process."""
    return build_registry()


def get_backend(name: str) -> Backend:
    return get_registry().get(name)


def get_strategy(name: str) -> Strategy:
    return get_registry().get_strategy(name)
