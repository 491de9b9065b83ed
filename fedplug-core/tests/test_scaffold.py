"""`fedplug new-backend`: the generated project installs, conforms and runs; bad names are refused.

The slow test installs fedplug-core (from this repo) and the generated project with
``pip install -e`` into a fresh virtual environment. pip installs from a wheelhouse
of fedplug-core's dependencies, offline; the first run fills it from the package index
(``FEDPLUG_TEST_WHEELHOUSE`` chooses where it lives).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedplug.backend import OPERATIONS, Backend
from fedplug.config import resolve
from fedplug.numpy_backend import NumpyBackend
from fedplug.scaffold import ScaffoldError, scaffold
from fedplug.testing import BackendConformance
from fedplug.testing.runs import fedplug

CORE = Path(__file__).resolve().parents[2] / "fedplug-core"
WHEELHOUSE = Path(os.environ.get("FEDPLUG_TEST_WHEELHOUSE", Path.home() / ".cache" / "fedplug" / "test-wheelhouse"))
NAME = "my_thing"
"""With an underscore, to check the distribution name fedplug-my-thing."""


def clean_env() -> dict[str, str]:
    """This process's environment without what would leak into another virtual environment."""
    leaks = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FEDPLUG_PLUGINS", "FEDPLUG_STRICT")
    return {key: value for key, value in os.environ.items() if key not in leaks}


def run(*command: str | Path, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, env=clean_env(), **kwargs
    )


def pip_install(venv: Path, *requirements: str | Path) -> None:
    """Install from the wheelhouse without the network; fill the wheelhouse first if it lacks something."""
    pip = venv / "bin" / "pip"
    offline = (pip, "install", "--no-index", "--find-links", WHEELHOUSE, *requirements)
    done = run(*offline)
    if done.returncode != 0:
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        # hatchling and editables build the projects; fedplug-core itself always comes from CORE
        filled = run(pip, "wheel", "--wheel-dir", WHEELHOUSE, CORE, "pytest", "hatchling", "editables")
        assert filled.returncode == 0, f"cannot fill the wheelhouse {WHEELHOUSE}:\n{filled.stderr[-3000:]}"
        for stale in WHEELHOUSE.glob("fedplug_core-*.whl"):
            stale.unlink()
        done = run(*offline)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict[str, float]]]:
    """A fresh venv holding fedplug-core and the `fedplug new-backend` project: (venv, project, seconds)."""
    root = tmp_path_factory.mktemp("scaffold")
    project, venv = root / "project", root / "venv"
    seconds: dict[str, float] = {}
    done = fedplug("new-backend", NAME, str(project))
    assert done.returncode == 0, done.stderr
    assert f"created {project}" in done.stdout
    started = time.monotonic()
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip_install(venv, CORE, "-e", project, "pytest")
    seconds["fresh venv + pip install"] = time.monotonic() - started
    yield venv, project, seconds
    print("\nfresh-venv scaffold test, seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    shutil.rmtree(venv, ignore_errors=True)  # about 1 GB


def test_generated_project_installs_is_listed_conforms_and_runs(installed, tmp_path: Path) -> None:
    venv, project, seconds = installed
    where = run(venv / "bin" / "python", "-c", f"import fedplug_{NAME}; print(fedplug_{NAME}.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(project), "the plugin is not installed editable"

    listed = run(venv / "bin" / "fedplug", "list", "--json", timeout=120)
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"numpy", NAME}, "the fresh venv holds only fedplug-core and the new plugin"
    assert rows[NAME]["status"] == "ok"
    assert (rows[NAME]["distribution"], rows[NAME]["version"]) == ("fedplug-my-thing", "0.1.0")

    started = time.monotonic()
    tests = run(venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", project / "tests", cwd=project)
    seconds["generated tests"] = time.monotonic() - started
    assert tests.returncode == 0, f"the generated conformance tests fail:\n{tests.stdout[-5000:]}"
    assert " passed" in tests.stdout and "skipped" not in tests.stdout

    started = time.monotonic()
    out = tmp_path / "run"
    ran = run(venv / "bin" / "fedplug", "run", NAME, "--rounds", "1", "--nodes", "2", "--out", out)
    seconds["fedplug run"] = time.monotonic() - started
    assert ran.returncode == 0, f"fedplug run {NAME} failed:\n{ran.stdout}\n{ran.stderr}"
    assert (out / "metrics.json").is_file() and (out / "model.npz").is_file()
    assert len(json.loads((out / "metrics.json").read_text())["rounds"]) >= 1


# -- what the generated project holds (fast, in this process) --------------------------------


def test_generated_files_hold_the_entry_point_and_a_registered_backend(tmp_path: Path) -> None:
    target = scaffold(NAME, tmp_path / "new", installed={"numpy"})
    assert target == tmp_path / "new"
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "README.md",
        "pyproject.toml",
        f"src/fedplug_{NAME}/__init__.py",
        f"src/fedplug_{NAME}/impl.py",
        "tests/test_conformance.py",
    ]
    project = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert (project["name"], project["version"]) == ("fedplug-my-thing", "0.1.0")
    assert [dep.split(">")[0] for dep in project["dependencies"]] == ["fedplug-core"]
    assert project["entry-points"]["fedplug"] == {NAME: f"fedplug_{NAME}"}
    assert 'backend_name = "my_thing"' in (target / "tests" / "test_conformance.py").read_text()
    readme = (target / "README.md").read_text()
    for needed in ("replace this with your framework", "pytest", "python -m build", "twine upload"):
        assert needed in readme

    spec = importlib.util.spec_from_file_location("generated", target / "src" / f"fedplug_{NAME}" / "__init__.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    found: list[object] = []
    module.fedplug_register_backends(found.append)
    (backend,) = found
    assert isinstance(backend, Backend) and not isinstance(backend, NumpyBackend) and backend.name == NAME
    assert backend.implementation == f"fedplug_{NAME}.impl:MyThingImplementation"
    assert not any(name in vars(type(backend)) for name in OPERATIONS), "the descriptor forwards nothing itself"
    impl = (target / "src" / f"fedplug_{NAME}" / "impl.py").read_text()
    assert "class MyThingImplementation(NumpyImplementation)" in impl and "replace this with your framework" in impl
    assert "replace this with your framework" in (target / "src" / f"fedplug_{NAME}" / "__init__.py").read_text()


def generated_backend(target: Path) -> Backend:
    spec = importlib.util.spec_from_file_location("generated", target / "src" / f"fedplug_{NAME}" / "__init__.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    found: list[Backend] = []
    module.fedplug_register_backends(found.append)
    return found[0]


def test_generated_descriptor_passes_the_attribute_checks(tmp_path: Path) -> None:
    """The description does not repeat the name (fedplug shows 'name: description'); the tier is declared."""
    backend = generated_backend(scaffold(NAME, tmp_path / "new", installed={"numpy"}))
    assert not backend.description.startswith(NAME) and "\n" not in backend.description
    assert "conformance" in vars(type(backend)) and backend.conformance == "mixable"
    BackendConformance().test_default_config_complete_and_typed(backend, resolve(backend, {}))


def test_an_empty_existing_directory_is_fine(tmp_path: Path) -> None:
    assert scaffold("other", tmp_path, installed=set()) == tmp_path
    assert (tmp_path / "pyproject.toml").is_file()


# -- refusals, through the real command ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("1thing", "is not a valid Python identifier"),
        ("my-thing", "is not a valid Python identifier"),
        ("class", "is a Python keyword"),
        ("numpy", "a backend named 'numpy' is already installed"),
        ("MyThing", "must be lowercase ASCII letters"),
        ("core", "would make the distribution fedplug-core"),
    ],
)
def test_bad_names_are_refused_with_one_line(tmp_path: Path, name: str, says: str) -> None:
    target = tmp_path / "new"
    done = fedplug("new-backend", name, str(target), env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("fedplug: error: ") and says in line, line
    assert not target.exists()


def test_a_non_empty_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    done = fedplug("new-backend", "mything", str(tmp_path), env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"fedplug: error: {tmp_path} already exists and is not empty: choose a new or empty directory"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_scaffold_error_is_raised_for_an_installed_name(tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError, match="already installed"):
        scaffold("torch", tmp_path / "x", installed={"numpy", "torch"})


# -- fedplug new-strategy ------------------------------------------------------------------------

STRATEGY = "my_rule"


def test_new_strategy_installs_is_listed_passes_its_suite_and_runs(tmp_path: Path) -> None:
    """The generated strategy project, pip-installed (built by hatchling) into a folder of its own, then used."""
    project, site = tmp_path / "project", tmp_path / "site"
    done = fedplug("new-strategy", STRATEGY, str(project), env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 0 and f"created {project}" in done.stdout, done.stderr
    install = ("install", "--no-index", "--find-links", WHEELHOUSE, "--no-deps", "--target", site, project)
    if run(sys.executable, "-m", "pip", *install).returncode != 0:  # an empty wheelhouse: fill it as above
        WHEELHOUSE.mkdir(parents=True, exist_ok=True)
        assert run(sys.executable, "-m", "pip", "wheel", "--wheel-dir", WHEELHOUSE, "hatchling").returncode == 0
    installed = run(sys.executable, "-m", "pip", *install)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**clean_env(), "PYTHONPATH": os.pathsep.join([str(site), *sys.path[1:]]), "FEDPLUG_PLUGINS": STRATEGY}
    fedplug_bin = Path(sys.executable).with_name("fedplug")

    def used(*command: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
        parts = [str(part) for part in command]
        return subprocess.run(parts, capture_output=True, text=True, timeout=900, env=env, **kwargs)

    listed = used(fedplug_bin, "list", "--strategies", "--json")
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert (rows[STRATEGY]["distribution"], rows[STRATEGY]["version"]) == ("fedplug-my-rule", "0.1.0")
    assert rows[STRATEGY]["parameters"]["server-lr"] == {"default": 1.0, "type": "float", "range": "(0, 2]"}
    (project / "pytest.ini").write_text("[pytest]\n")  # keep the repository's pytest settings out
    tests = used(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", project / "tests", cwd=project)
    from fedplug.testing import StrategyConformance

    suite = [name for name in dir(StrategyConformance) if name.startswith("test_")]  # every check of the suite ran
    assert tests.returncode == 0 and f"{len(suite)} passed" in tests.stdout, tests.stdout[-3000:]
    out = tmp_path / "run"
    args = ("--rounds", "1", "--nodes", "2", "--out", out, "--run-config", "strategy.server-lr=0.5")
    ran = used(fedplug_bin, "run", "numpy", "--strategy", STRATEGY, *args)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["rounds"][-1]["train-nodes"] == 2
    refused = used(fedplug_bin, "run", "numpy", "--strategy", STRATEGY, "--run-config", "strategy.server-lr=3")
    assert refused.returncode == 2
    said = "fedplug: error: strategy 'my_rule': 'strategy.server-lr' must be in (0, 2], got 3.0"
    assert refused.stderr.strip() == said


def test_new_strategy_refuses_an_installed_name(tmp_path: Path) -> None:
    done = fedplug("new-strategy", "fedavg", str(tmp_path / "new"), env={"FEDPLUG_PLUGINS": ""})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "fedplug: error: a strategy named 'fedavg' is already installed (see `fedplug list`): choose another name"
    ]
