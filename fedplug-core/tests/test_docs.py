"""The plugin author guide, docs/plugins.md, keeps up with the contract it documents."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from fedplug import hookspecs, toolkit
from fedplug.backend import OPERATIONS, Backend, Implementation
from fedplug.plugins import ENTRY_POINT_GROUP, PLUGINS_ENV, STRICT_ENV
from fedplug.testing import BackendConformance

pytestmark = pytest.mark.fast

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
TEXT = GUIDE.read_text(encoding="utf-8")

HOOKS = [
    function
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
    if name.startswith("fedplug_") and hasattr(function, f"{hookspecs.PROJECT_NAME}_spec")
]
BACKEND_MEMBERS = sorted(name for name in {*vars(Backend), *Backend.__annotations__} if not name.startswith("_"))
CHECKS = sorted(name for name in dir(BackendConformance) if name.startswith("test_"))
TOOLKIT = sorted(name for name in toolkit.__all__)


def test_the_hookspec_module_has_hooks() -> None:
    assert HOOKS, "no fedplug_* hookspec found: did the marker change?"


@pytest.mark.parametrize("hook", HOOKS, ids=lambda hook: hook.__name__)
def test_every_hook_is_documented_with_its_signature(hook) -> None:
    parameters = ", ".join(inspect.signature(hook).parameters)
    call = f"{hook.__name__}({parameters})"
    assert f"def {hook.__name__}(" in TEXT, f"docs/plugins.md lacks the hook {hook.__name__} and its signature"
    assert call in TEXT, f"docs/plugins.md must show the call {call}"
    assert re.search(rf"@fedplug\.hookimpl\ndef {hook.__name__}\(", TEXT), (
        f"docs/plugins.md lacks a minimal @fedplug.hookimpl example of {hook.__name__}"
    )


@pytest.mark.parametrize("member", BACKEND_MEMBERS)
def test_every_public_backend_member_is_documented(member: str) -> None:
    assert re.search(rf"`{member}\b", TEXT), f"docs/plugins.md does not document Backend.{member}"


@pytest.mark.parametrize("check", CHECKS)
def test_every_conformance_check_is_listed(check: str) -> None:
    assert f"`{check}`" in TEXT, f"docs/plugins.md does not list the conformance check {check}"


@pytest.mark.parametrize(
    "word",
    [
        PLUGINS_ENV,
        STRICT_ENV,
        f"[project.entry-points.{ENTRY_POINT_GROUP}]",
        "fedplug new-backend",
        "python -m build",
        "twine upload",
    ],
)
def test_switches_and_commands_are_documented(word: str) -> None:
    assert word in TEXT


def test_python_examples_are_valid_python() -> None:
    blocks = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        ast.parse(block)


@pytest.mark.parametrize("check", CHECKS)
def test_every_conformance_check_says_what_it_guards_and_how_to_fix_it(check: str) -> None:
    doc = getattr(BackendConformance, check).__doc__ or ""
    assert "Fix" in doc and len(doc.split()) > 15, f"{check} needs a docstring: what it guards and how to fix a failure"


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_is_an_abstract_method_of_the_implementation(operation: str) -> None:
    assert operation in Implementation.__abstractmethods__
    assert f"`{operation}(" in TEXT


@pytest.mark.parametrize("name", TOOLKIT)
def test_every_toolkit_helper_is_documented(name: str) -> None:
    assert f"`{name}" in TEXT, f"docs/plugins.md does not document fedplug.toolkit.{name}"


@pytest.mark.parametrize(
    "topic",
    [
        "fedplug.Implementation",
        'implementation = "module:Class"',
        "removed in fedplug 0.3",
        "drops an odd last row or column",
        "safetensors, Flax msgpack or `.npz`",
        "Keep no state from one call to the next",
        "refuses `--strategy fedprox`",
        "A walk through a real backend",
        "fedplug-core[testing]",
        "SpecifierSet",
    ],
)
def test_the_contract_v2_topics_are_explained(topic: str) -> None:
    assert topic in TEXT
