"""The backend API is declared: ``fedplug.__all__`` and ``fedplug.toolkit`` are all a backend imports.

Checked on the sources of the six bundled backends (``numpy`` in the core, and the five
distributions beside it) and on what ``fedplug new-backend`` generates, by parsing them:
nothing is imported, so no framework needs to be installed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import fedplug
from fedplug import toolkit
from fedplug.config import CORE_DEFAULTS
from fedplug.scaffold import scaffold

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = ("torch", "jax", "keras", "mlx", "mxnet")
MODULES = {"__init__.py", "framework.py", "nets.py", "training.py"}
"""Every backend package's modules: the descriptor, the framework's import and availability, the models,
the implementation."""
SURFACE = {"fedplug": set(fedplug.__all__) | {"toolkit"}, "fedplug.toolkit": set(toolkit.__all__)}


def backend_sources() -> dict[str, list[Path]]:
    sources = {"numpy": [ROOT / "fedplug-core" / "src" / "fedplug" / "numpy_backend.py"]}
    for name in DISTRIBUTIONS:
        sources[name] = sorted((ROOT / f"fedplug-{name}" / "src" / f"fedplug_{name}").glob("*.py"))
    return sources


def outside_the_api(path: Path) -> Iterator[str]:
    """Each use of fedplug in ``path`` that is not in the declared API, as ``line: what``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    modules = {"fedplug": "fedplug"}  # a local name -> the fedplug module it names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fedplug":
                    if alias.name not in SURFACE:
                        yield f"{node.lineno}: import {alias.name}"
                    modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fedplug":
            for alias in node.names:
                if alias.name not in SURFACE.get(node.module, set()):
                    yield f"{node.lineno}: from {node.module} import {alias.name}"
                if f"{node.module}.{alias.name}" in SURFACE:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):  # fedplug.X and toolkit.X
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            if node.attr not in SURFACE[module]:
                yield f"{node.lineno}: {module}.{node.attr}"


def test_the_api_is_what_fedplug_and_its_toolkit_export() -> None:
    for module in (fedplug, toolkit):
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names what it lacks: {missing}"
    for name in ("Backend", "Implementation", "Framework", "ConfigError", "hookimpl"):
        assert name in fedplug.__all__
    assert {"TrainSettings", "cpu_share", "canonical_shapes", "check_custom_model", "eval_chunks"} <= SURFACE[
        "fedplug.toolkit"
    ]


def test_the_checker_catches_an_import_from_outside_the_api(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text(
        "import fedplug\nimport fedplug.models\nfrom fedplug import toolkit, Backend, plugins\n"
        "from fedplug.runtime import cpu_share\nfrom fedplug.toolkit import cpu_share, secret\n"
        "x = fedplug.Framework, fedplug.cli, toolkit.metrics, toolkit.nothing\n"
    )
    assert list(outside_the_api(source)) == [
        "2: import fedplug.models",
        "3: from fedplug import plugins",
        "4: from fedplug.runtime import cpu_share",
        "5: from fedplug.toolkit import secret",
        "6: fedplug.cli",
        "6: fedplug.toolkit.nothing",
    ]


@pytest.mark.parametrize("backend", ["numpy", *DISTRIBUTIONS])
def test_every_backend_imports_only_the_api(backend: str) -> None:
    sources = backend_sources()[backend]
    assert sources, f"no sources for backend {backend}"
    outside = [f"{path.relative_to(ROOT)}:{use}" for path in sources for use in outside_the_api(path)]
    assert not outside, "imports outside fedplug.__all__ and fedplug.toolkit:\n" + "\n".join(outside)


def test_the_scaffold_s_backend_imports_only_the_api(tmp_path: Path) -> None:
    project = scaffold("apicheck", tmp_path / "fedplug-apicheck", set())
    sources = sorted((project / "src").rglob("*.py"))
    assert {path.name for path in sources} == {"__init__.py", "impl.py"}
    outside = [f"{path.name}:{use}" for path in sources for use in outside_the_api(path)]
    assert not outside, "the generated backend imports outside the API:\n" + "\n".join(outside)


@pytest.mark.parametrize("backend", DISTRIBUTIONS)
def test_every_backend_has_the_same_modules(backend: str) -> None:
    assert {path.name for path in backend_sources()[backend]} == MODULES


@pytest.mark.parametrize("backend", ["numpy", *DISTRIBUTIONS])
def test_no_backend_default_restates_the_core_s(backend: str) -> None:
    path = backend_sources()[backend][0] if backend == "numpy" else backend_sources()[backend][0].parent / "__init__.py"
    found = 0
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Dict):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(target, ast.Name) and target.id == "defaults" for target in targets):
                found += 1
                for key, value in zip(node.value.keys, node.value.values):
                    if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) and key.value in CORE_DEFAULTS:
                        assert value.value != CORE_DEFAULTS[key.value], (
                            f"{backend} restates {key.value}={value.value!r}"
                        )
    assert found == 1, f"{path} should declare defaults once, as a dict"
