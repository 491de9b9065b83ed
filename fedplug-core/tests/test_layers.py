"""Every module of the core has its place in the layers contract (root pyproject.toml, checked by ``lint-imports``).

import-linter checks only the modules a contract names: a module left out of the ``layers`` list could import
anything and be imported by anything, and the architecture in docs/architecture.md would no longer be the code's.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fedplug-core" / "src" / "fedplug"


def _listed() -> set[str]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(contract for contract in contracts if contract["type"] == "layers")["layers"]
    return {name.strip() for layer in layers for name in layer.split("|")}


def _modules() -> set[str]:
    modules = {f"fedplug.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    packages = {f"fedplug.{path.name}" for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    return modules | packages


@pytest.mark.fast
def test_every_core_module_is_in_the_layers_contract() -> None:
    missing = _modules() - _listed()
    assert missing == set(), "add these to the layers of the root pyproject.toml and to docs/architecture.md"
    assert _listed() - _modules() == set(), "the contract names modules that do not exist"
