"""The plugin author guide, docs/plugins.md, keeps up with the contract it documents.

Not word searches: the guide's tables are compared with the code (every hook, every descriptor
attribute, every operation with its parameters, every toolkit name, every conformance check
with its tier, every tolerance with its default), its Python blocks must import only what
fedplug offers plugin authors and use only real attributes, its interactive examples run
(doctest), and every ``fedplug.x.y`` it names exists.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import importlib
import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import fedplug
from fedplug import hookspecs, toolkit
from fedplug.backend import OPERATIONS, Backend, Implementation
from fedplug.plugins import ENTRY_POINT_GROUP, PLUGINS_ENV, STRICT_ENV
from fedplug.testing import BackendConformance, BasicConformance

pytestmark = pytest.mark.fast

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
TEXT = GUIDE.read_text(encoding="utf-8")

HOOKS = [
    function
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("fedplug_") and hasattr(function, f"{hookspecs.PROJECT_NAME}_spec")
]
ATTRIBUTES = sorted(name for name in Backend.__annotations__ if not name.startswith("_"))
"""The descriptor's class attributes."""
DESCRIPTOR_METHODS = ("check_available", "check_config", "environment")
CUSTOM_OPERATIONS = ("build_custom", "get_native_weights", "set_native_weights")
CHECKS = sorted(name for name in dir(BackendConformance) if name.startswith("test_"))
PLUGIN = ("fedplug_mything", "mything")
"""The guide's example plugin and its framework: its blocks may import them."""


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TEXT, flags=re.DOTALL)


def section(title: str) -> str:
    """The text under the heading ``title`` (any level), up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", TEXT, flags=re.MULTILINE)
    assert match, f"docs/plugins.md has no section '{title}'"
    level = len(match.group(1))
    end = re.search(rf"^#{{1,{level}}} ", TEXT[match.end() :], flags=re.MULTILINE)
    return TEXT[match.end() : match.end() + end.start() if end else len(TEXT)]


def first_cells(text: str) -> list[str]:
    """The first cell of every body row of the markdown tables in ``text``, without its backticks."""
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def parameters(function: Any) -> str:
    """``name(a, b)`` for a method, without ``self``."""
    names = [name for name in inspect.signature(function).parameters if name != "self"]
    return f"{function.__name__}({', '.join(names)})"


# -- the hook ----------------------------------------------------------------------------------


def test_the_hookspec_module_has_hooks() -> None:
    assert HOOKS, "no fedplug_* hookspec found: did the marker change?"


@pytest.mark.parametrize("hook", HOOKS, ids=lambda hook: hook.__name__)
def test_every_hook_is_shown_with_its_signature_and_an_implementation(hook: Any) -> None:
    defined = [node for block in blocks("python") for node in ast.walk(ast.parse(block))]
    functions = [node for node in defined if isinstance(node, ast.FunctionDef) and node.name == hook.__name__]
    expected = list(inspect.signature(hook).parameters)
    assert any([arg.arg for arg in f.args.args] == expected for f in functions), (
        f"docs/plugins.md must show {hook.__name__}({', '.join(expected)})"
    )
    assert any(ast.unparse(d) == "fedplug.hookimpl" for f in functions for d in f.decorator_list), (
        f"docs/plugins.md lacks a minimal @fedplug.hookimpl example of {hook.__name__}"
    )


def test_the_entry_point_example_uses_fedplugs_group() -> None:
    (toml,) = blocks("toml")
    assert list(tomllib.loads(toml)["project"]["entry-points"]) == [ENTRY_POINT_GROUP]


# -- the descriptor and the implementation -------------------------------------------------------


def test_the_attribute_table_lists_exactly_the_descriptors_attributes() -> None:
    rows = first_cells(section("Attributes of the descriptor"))
    assert sorted(rows) == ATTRIBUTES, (
        f"missing {sorted(set(ATTRIBUTES) - set(rows))}, stale {sorted(set(rows) - set(ATTRIBUTES))}"
    )


def test_the_operation_table_lists_every_operation_with_its_parameters() -> None:
    rows = first_cells(section("Operations of the implementation"))
    expected = [parameters(getattr(Implementation, name)) for name in OPERATIONS]
    assert [row for row in rows if row.split("(")[0] in OPERATIONS] == expected
    # the descriptor's own methods; check_available is documented with the run config it is being given
    assert [row.split("(")[0] for row in rows if row.split("(")[0] not in OPERATIONS] == list(DESCRIPTOR_METHODS)
    for name in ("check_config", "environment"):
        assert parameters(getattr(Backend, name)) in rows


def test_the_custom_model_table_lists_its_operations_with_their_parameters() -> None:
    rows = first_cells(section("Custom models"))
    assert rows == [parameters(getattr(Implementation, name)) for name in CUSTOM_OPERATIONS]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_is_an_abstract_method_of_the_implementation(operation: str) -> None:
    assert operation in Implementation.__abstractmethods__


# -- the toolkit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", toolkit.__all__)
def test_every_toolkit_name_is_documented_in_the_toolkit_section(name: str) -> None:
    assert f"`{name}" in section("The toolkit"), f"'The toolkit' does not document fedplug.toolkit.{name}"


@pytest.mark.parametrize(
    "member",
    sorted(
        {field.name for field in dataclasses.fields(toolkit.TrainSettings)}
        | {name for name, _ in inspect.getmembers(toolkit.TrainSettings) if not name.startswith("_")}
    ),
)
def test_every_train_settings_member_is_documented(member: str) -> None:
    documented = re.search(rf"`((Train)?[sS]ettings\.)?{member}\b", section("The toolkit"))
    assert documented, f"TrainSettings.{member} is undocumented"


# -- the conformance suite -------------------------------------------------------------------------


def test_the_check_table_lists_every_check_with_its_tier() -> None:
    rows = re.findall(r"^\| `(test_\w+)` \| (\w+) \|", section("The conformance suite"), flags=re.MULTILINE)
    expected = {(check, "basic" if hasattr(BasicConformance, check) else "mixable") for check in CHECKS}
    assert set(rows) == expected and len(rows) == len(expected), (
        f"missing or wrong tier: {sorted(expected - set(rows))}; stale: {sorted(set(rows) - expected)}"
    )


@pytest.mark.parametrize("check", CHECKS)
def test_every_conformance_check_says_what_it_guards_and_how_to_fix_it(check: str) -> None:
    doc = getattr(BackendConformance, check).__doc__ or ""
    assert "Fix" in doc and len(doc.split()) > 15, f"{check} needs a docstring: what it guards and how to fix a failure"


def test_the_tolerances_are_documented_with_their_defaults() -> None:
    documented = dict(re.findall(r"`(\w+_atol)` \(default `([^`]+)`", TEXT))
    expected = {name: getattr(BackendConformance, name) for name in dir(BackendConformance) if name.endswith("_atol")}
    assert {name: float(value) for name, value in documented.items()} == expected


# -- the code in the guide --------------------------------------------------------------------------


def public_names(module_name: str) -> set[str]:
    """What a fedplug module offers plugin authors: its ``__all__``, else the names the guide documents."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return set(module.__all__)
    return {name for name in vars(module) if not name.startswith("_") and f"{module_name}.{name}" in TEXT} | {
        name for name in vars(module) if not name.startswith("_") and f"`{name}`" in TEXT
    }


def uses(tree: ast.AST, name: str) -> set[str]:
    """The attributes read from the name ``name`` in ``tree``."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == name
    }


@pytest.mark.parametrize("block", blocks("python"), ids=lambda block: block.split("\n", 1)[0][:40])
def test_python_blocks_are_valid_and_use_only_the_declared_surface(block: str) -> None:
    tree = ast.parse(block)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                assert root in ("fedplug", *PLUGIN), f"the guide imports {alias.name}"
                if root == "fedplug":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            assert root in ("fedplug", *PLUGIN), f"the guide imports from {node.module}"
            if root == "fedplug":
                offered = public_names(node.module)
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    assert alias.name in offered or (f"`{submodule}`" in TEXT and importlib.import_module(submodule)), (
                        f"the guide imports {submodule}, which fedplug does not offer plugin authors"
                    )
    assert uses(tree, "fedplug") <= set(fedplug.__all__) | {"hookimpl"}, "the guide uses a fedplug name not offered"
    assert uses(tree, "toolkit") <= set(toolkit.__all__), "the guide uses a toolkit name that does not exist"
    settings = {field.name for field in dataclasses.fields(toolkit.TrainSettings)} | set(dir(toolkit.TrainSettings))
    assert uses(tree, "settings") <= settings, "the guide uses a TrainSettings member that does not exist"


@pytest.mark.parametrize("block", blocks("python"), ids=lambda block: block.split("\n", 1)[0][:40])
def test_classes_in_the_guide_set_only_what_their_base_has(block: str) -> None:
    """A descriptor sets only ``Backend`` attributes, an implementation defines only its operations."""
    bases = {"fedplug.Backend": Backend, "fedplug.Implementation": Implementation}
    bases["BackendConformance"] = BackendConformance
    for node in ast.walk(ast.parse(block)):
        if not isinstance(node, ast.ClassDef):
            continue
        (base,) = [bases[ast.unparse(b)] for b in node.bases if ast.unparse(b) in bases]
        for statement in node.body:
            if isinstance(statement, ast.Assign | ast.AnnAssign):
                targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
                names = [target.id for target in targets if isinstance(target, ast.Name)]
            elif isinstance(statement, ast.FunctionDef):
                names = [statement.name]
            else:
                continue
            for name in names:
                annotated = any(name in getattr(cls, "__annotations__", {}) for cls in base.__mro__)
                assert hasattr(base, name) or annotated, (
                    f"class {node.name} in docs/plugins.md sets {name}, which {base.__name__} does not have"
                )


def test_the_interactive_examples_run() -> None:
    examples = blocks("pycon")
    assert examples
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    namespace: dict[str, Any] = {}  # the examples build on each other, as read in order
    for number, example in enumerate(examples):
        test = parser.get_doctest(example, namespace, f"docs/plugins.md pycon block {number}", str(GUIDE), 0)
        runner.run(test, clear_globs=False)
        namespace.update(test.globs)
    assert runner.failures == 0, f"{runner.failures} interactive examples of docs/plugins.md fail (see output)"


def test_every_fedplug_name_the_guide_gives_exists() -> None:
    missing = []
    for reference in sorted(set(re.findall(r"`(fedplug(?:\.[A-Za-z_]\w*)+)", TEXT))):
        parts = reference.split(".")
        for end in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                found: Any = importlib.import_module(".".join(parts[:end]))
            except ImportError:
                continue
            try:
                for attribute in parts[end:]:
                    found = getattr(found, attribute)
            except AttributeError:
                missing.append(reference)
            break
    assert not missing, f"docs/plugins.md names what does not exist: {missing}"


def test_the_commands_in_the_guide_exist() -> None:
    import typer

    from fedplug.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    used = set(re.findall(r"^fedplug ([a-z][a-z-]*)", "\n".join(blocks("bash")), flags=re.MULTILINE))
    used |= set(re.findall(r"`fedplug ([a-z][a-z-]*)", TEXT))
    assert used and used <= commands, f"the guide uses commands fedplug does not have: {sorted(used - commands)}"


@pytest.mark.parametrize("switch", [PLUGINS_ENV, STRICT_ENV])
def test_the_plugin_switches_are_documented(switch: str) -> None:
    assert f"`{switch}" in section("Using plugins")
