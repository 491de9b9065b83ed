"""fedplug uses Flower (and flwr-datasets) through their public API only, except in ``fedplug.flower_adapter``.

Flower's rule: "every component reachable by recursively following ``__init__.__all__`` from ``flwr`` is
public; private APIs can change at any time, even in patch releases". This test computes that public tree
from the installed Flower, parses every Python file of the six distributions' ``src/`` and of the test
plugins, and names file:line for each Flower name outside it: imports (``import flwr.x``, ``from flwr.x
import y``), attribute chains on a bound Flower module (``flwr.supercore.telemetry``, ``strategy.x``) and
module paths written as strings (``sys.modules["flwr.simulation"]``, ``import_module("flwr.x")``).
A name fedplug needs from outside the tree goes into ``fedplug/flower_adapter.py``, with a test in
``test_flower_adapter.py``.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.fast

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("flwr", "flwr_datasets")
"""The distributions whose public tree is checked: Flower, and flwr-datasets (same rule, same maintainers)."""
ADAPTER = REPO / "fedplug-core" / "src" / "fedplug" / "flower_adapter.py"
MODULE_PATH = re.compile(r"(?:flwr|flwr_datasets)(?:\.[A-Za-z_]\w*)+")


@cache
def public_tree(root: str) -> dict[str, bool]:
    """Every public dotted name under ``root`` (the package's own ``__all__``, recursively), with whether it
    is a module. Attributes of a public class or function are public too: they are not listed here."""
    tree = {root: True}

    def walk(path: str, module: ModuleType) -> None:
        for name in getattr(module, "__all__", ()):
            try:
                value = getattr(module, name)
            except (AttributeError, ImportError):
                value = importlib.import_module(f"{module.__name__}.{name}")
            dotted = f"{path}.{name}"
            if dotted in tree:
                continue
            tree[dotted] = isinstance(value, ModuleType)
            if tree[dotted]:
                walk(dotted, value)

    walk(root, importlib.import_module(root))
    return tree


def private_part(dotted: str) -> str | None:
    """The first name of ``dotted`` (a Flower path) outside the public tree, or None if all of it is public."""
    parts = dotted.split(".")
    tree = public_tree(parts[0])
    path = parts[0]
    for part in parts[1:]:
        if not tree[path]:
            return None  # an attribute of a public class, function or constant
        path = f"{path}.{part}"
        if path not in tree:
            return path
    return None


def _is_flower(dotted: str) -> bool:
    return dotted.split(".")[0] in ROOTS


class _Scanner(ast.NodeVisitor):
    """Every Flower name a module uses, with its line: imports, attribute chains and module-path strings.

    Names are resolved with Python's scoping: a name bound by an import in a scope stands for that Flower
    path in the scope and the scopes nested in it, unless a nested scope binds the name itself."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, str | None]] = []
        self.used: list[tuple[int, str]] = []
        self.docstrings: set[int] = set()

    # -- scopes ---------------------------------------------------------------------------------
    @staticmethod
    def _bindings(body: list[ast.stmt] | ast.expr, args: ast.arguments | None = None) -> dict[str, str | None]:
        """Names bound in one scope: an import's Flower path, or None for any other binding."""
        imported: dict[str, str | None] = {}
        other: set[str] = set()
        if args is not None:
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            other |= {arg.arg for arg in every if arg is not None}
        stack: list[ast.AST] = list(body) if isinstance(body, list) else [body]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        imported[alias.asname] = alias.name
                    else:
                        top = alias.name.split(".")[0]
                        imported[top] = top
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if node.level == 0 and node.module and alias.name != "*":
                        imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                other.add(node.name)
                stack.extend(node.decorator_list)
                continue  # a scope of its own
            elif isinstance(node, ast.Lambda):
                continue
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
                other.add(node.id)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                other.add(node.name)
            stack.extend(ast.iter_child_nodes(node))
        scope: dict[str, str | None] = {name: None for name in other}
        scope.update({name: path for name, path in imported.items() if _is_flower(path)})
        scope.update({name: None for name, path in imported.items() if not _is_flower(path)})
        return scope

    def _resolve(self, name: str) -> str | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def _in_scope(self, node: ast.AST, bindings: dict[str, str | None]) -> None:
        self.scopes.append(bindings)
        self.generic_visit(node)
        self.scopes.pop()

    def visit_Module(self, node: ast.Module) -> None:
        self._docstring(node)
        self._in_scope(node, self._bindings(node.body))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._docstring(node)
        self._in_scope(node, self._bindings(node.body, node.args))

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._docstring(node)
        self._in_scope(node, self._bindings(node.body))

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._in_scope(node, self._bindings(node.body, node.args))

    def _docstring(self, node: ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            self.docstrings.add(id(node.body[0].value))

    # -- uses -----------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _is_flower(alias.name):
                self.used.append((node.lineno, alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module or not _is_flower(node.module):
            return
        for alias in node.names:
            self.used.append((node.lineno, node.module if alias.name == "*" else f"{node.module}.{alias.name}"))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts: list[str] = []
        value: ast.expr = node
        while isinstance(value, ast.Attribute):
            parts.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name):
            path = self._resolve(value.id)
            if path is not None:
                self.used.append((node.lineno, ".".join([path, *reversed(parts)])))
            return  # the inner attributes are part of this chain
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and id(node) not in self.docstrings and MODULE_PATH.fullmatch(node.value):
            self.used.append((node.lineno, node.value))


def private_uses(source: str, filename: str = "<source>") -> list[tuple[int, str, str]]:
    """``(line, name used, its first private part)`` for every use in ``source`` of a Flower name outside the
    public tree."""
    scanner = _Scanner()
    scanner.visit(ast.parse(source, filename))
    found = {(line, dotted, private_part(dotted)) for line, dotted in scanner.used}
    return sorted((line, dotted, private) for line, dotted, private in found if private is not None)


def scanned_files() -> Iterator[Path]:
    for folder in [*sorted(REPO.glob("fedplug-*/src")), *sorted(REPO.glob("tests/plugins/*/src"))]:
        yield from sorted(folder.rglob("*.py"))


def test_only_the_adapter_uses_flower_names_outside_its_public_api() -> None:
    files = [path for path in scanned_files() if path != ADAPTER]
    distributions = {path.relative_to(REPO).parts[0] for path in files}
    assert {f"fedplug-{name}" for name in ("core", "torch", "jax", "keras", "mlx", "mxnet")} <= distributions
    found = [
        f"{path.relative_to(REPO)}:{line}: {dotted} ({private} is not in Flower's public API)"
        for path in files
        for line, dotted, private in private_uses(path.read_text(encoding="utf-8"), str(path))
    ]
    assert not found, (
        "Flower names outside flwr's public API (recursive __all__); move each into "
        "fedplug-core/src/fedplug/flower_adapter.py with a test in test_flower_adapter.py:\n  " + "\n  ".join(found)
    )


def test_the_adapter_is_where_the_private_names_are() -> None:
    """The scan finds the adapter's private names: the exemption is what keeps them out of the report."""
    found = {private for _, _, private in private_uses(ADAPTER.read_text(encoding="utf-8"))}
    assert {"flwr.simulation", "flwr.supercore", "flwr.common", "flwr_datasets.common"} <= found


def test_the_configurable_strategies_are_public() -> None:
    """``fedplug.strategies`` looks strategies up by name in ``flwr.serverapp.strategy``: public names only."""
    from fedplug.builtin_strategies import FLOWER_CLASSES

    private = [f"flwr.serverapp.strategy.{name}" for name in FLOWER_CLASSES.values()]
    assert [name for name in private if private_part(name) is not None] == []


SYNTHETIC = '''\
"""A docstring naming flwr.simulation.run_simulation is prose, not a use."""
import sys

import flwr
import flwr.simulation.run_simulation
from flwr.app import ArrayRecord, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import strategy
import flwr.serverapp as serverapp_module


def main(grid):
    state = flwr.supercore.telemetry.state
    fedavg = strategy.FedAvg
    helper = strategy.strategy_utils
    grid_class = serverapp_module.Grid.pull_interval
    loaded = "flwr.simulation" in sys.modules
    return ArrayRecord(), Message, ErrorCode, state, fedavg, helper, grid_class, loaded


def shadowed(strategy):
    return strategy.strategy_utils


def public(flwr):
    return flwr.supercore
'''


def test_the_scan_names_each_private_use_and_no_public_one() -> None:
    assert private_uses(SYNTHETIC) == [
        (5, "flwr.simulation.run_simulation", "flwr.simulation"),
        (7, "flwr.common.constant.ErrorCode", "flwr.common"),
        (13, "flwr.supercore.telemetry.state", "flwr.supercore"),
        (15, "flwr.serverapp.strategy.strategy_utils", "flwr.serverapp.strategy.strategy_utils"),  # private module
        (17, "flwr.simulation", "flwr.simulation"),  # sys.modules["flwr.simulation"]
    ]


def test_the_scan_fails_the_repository_check_on_a_private_use(tmp_path: Path) -> None:
    """The same check as the repository test, on one file that uses a private name: it fails, naming file:line."""
    source = tmp_path / "module.py"
    source.write_text("def f():\n    from flwr.common.constant import ErrorCode\n    return ErrorCode\n")
    found = [f"{source.name}:{line}: {dotted}" for line, dotted, _ in private_uses(source.read_text())]
    assert found == ["module.py:2: flwr.common.constant.ErrorCode"]


def test_the_public_tree_is_flowers_recursive_all() -> None:
    tree = public_tree("flwr")
    assert tree["flwr.app"] and tree["flwr.serverapp.strategy"]  # modules, reached through __all__
    assert tree["flwr.app.Message"] is False and tree["flwr.serverapp.strategy.FedAvg"] is False
    assert "flwr.common" not in tree and "flwr.supercore" not in tree
    assert private_part("flwr.app.Message.metadata") is None  # an attribute of a public class
    assert private_part("flwr.app.message.Message") == "flwr.app.message"  # the defining module is private
