"""The six distributions are ready to publish, and the README's first screen is true.

Fast: every distribution's metadata is complete (licence expression and files, classifiers,
project URLs, a README whose links work on the package index, the core pin of the versioned
API), and the release workflow builds all six and publishes fedplug-core before the backends.

Slow (the full suite): the six wheels are built into a folder and, in a fresh virtual
environment, the first ```bash block of the root README runs as written, with `pip install`
finding fedplug's distributions in that folder (``--find-links``; the index still serves the
third-party dependencies); the run must learn.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "https://github.com/fedplug/fedplug"
CORE = "fedplug-core"
BACKENDS = ["fedplug-torch", "fedplug-jax", "fedplug-keras", "fedplug-mlx", "fedplug-mxnet"]
DISTRIBUTIONS = [CORE, *BACKENDS]
PUBLISH_ACTION = "pypa/gh-action-pypi-publish"


def pyproject(distribution: str) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / distribution / "pyproject.toml").read_text(encoding="utf-8"))
    return data


@pytest.mark.fast
def test_the_six_distributions_are_the_repository_folders() -> None:
    folders = sorted(p.parent.name for p in ROOT.glob("fedplug-*/pyproject.toml"))
    assert folders == sorted(DISTRIBUTIONS)
    assert [pyproject(d)["project"]["name"] for d in DISTRIBUTIONS] == DISTRIBUTIONS


@pytest.mark.fast
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_metadata_is_complete(distribution: str) -> None:
    project = pyproject(distribution)["project"]
    folder = ROOT / distribution
    # licence: an SPDX expression (PEP 639) and its files, shipped in the sdist and the wheel
    expected = "Apache-2.0 AND CC-BY-SA-3.0" if distribution == CORE else "Apache-2.0"
    assert project["license"] == expected
    assert project["license-files"], "no licence files"
    for name in project["license-files"]:
        assert (folder / name).is_file(), f"{distribution}: licence file {name} is missing"
    assert "Apache License" in (folder / "LICENSE").read_text(encoding="utf-8")
    if distribution == CORE:
        assert "CC BY-SA 3.0" in (folder / "LICENSE-MNIST").read_text(encoding="utf-8")
    # PyPI refuses licence classifiers next to a licence expression
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    assert {"Homepage", "Documentation", "Source", "Issues"} <= project["urls"].keys()
    assert all(url.startswith(REPOSITORY) for url in project["urls"].values())
    assert project["readme"] == "README.md" and (folder / "README.md").is_file()
    # PEP 639's license-files needs hatchling 1.27
    assert pyproject(distribution)["build-system"]["requires"] == ["hatchling>=1.27"]


@pytest.mark.fast
@pytest.mark.parametrize("distribution", BACKENDS)
def test_backends_pin_the_core_of_the_versioned_api(distribution: str) -> None:
    """The pin `fedplug scaffold` writes for a new backend: this minor version of the core."""
    major, minor = pyproject(CORE)["project"]["version"].split(".")[:2]
    pin = SpecifierSet(f">={major}.{minor},<{major}.{int(minor) + 1}")
    requirements = [Requirement(r) for r in pyproject(distribution)["project"]["dependencies"]]
    assert [r.specifier for r in requirements if r.name == CORE] == [pin]


@pytest.mark.fast
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_readme_links_work_on_the_package_index(distribution: str) -> None:
    """PyPI renders the README away from the repository: a relative link there leads nowhere."""
    text = (ROOT / distribution / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r"<(?:img|a)\b[^>]*(?:src|href)=\"([^\"]+)", text)
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#"))]
    assert relative == []


def workflow() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    return data


def steps_text(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) for step in job["steps"])


def publishes(job: dict[str, Any]) -> list[str]:
    """The distributions a publishing job uploads: the artifacts it downloads, one per distribution."""
    downloads = [
        s["with"]["name"] for s in job["steps"] if str(s.get("uses", "")).startswith("actions/download-artifact")
    ]
    assert len(downloads) == 1, downloads
    if downloads[0] == "dist-${{ matrix.distribution }}":
        return list(job["strategy"]["matrix"]["distribution"])
    assert downloads[0].startswith("dist-"), downloads
    return [downloads[0].removeprefix("dist-")]


@pytest.mark.fast
def test_release_workflow_builds_all_six_and_publishes_the_core_first() -> None:
    flow = workflow()
    on = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert on == {"push": {"tags": ["v*"]}}
    jobs = flow["jobs"]

    build = jobs["build"]
    assert build["runs-on"] == "ubuntu-latest"
    assert sorted(build["strategy"]["matrix"]["distribution"]) == sorted(DISTRIBUTIONS)
    setup = [s for s in build["steps"] if str(s.get("uses", "")).startswith("actions/setup-python")]
    assert [s["with"]["python-version"] for s in setup] == ["3.11"]
    commands = steps_text(build)
    assert "python -m build --outdir dist/ ${{ matrix.distribution }}" in commands  # sdist and wheel
    assert "twine check --strict dist/*" in commands
    uploads = [s for s in build["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert [s["with"]["name"] for s in uploads] == ["dist-${{ matrix.distribution }}"]

    publishing = {
        name: job
        for name, job in jobs.items()
        if any(str(s.get("uses", "")).startswith(PUBLISH_ACTION) for s in job["steps"])
    }
    published = {name: publishes(job) for name, job in publishing.items()}
    assert sorted(d for names in published.values() for d in names) == sorted(DISTRIBUTIONS)
    for name, job in publishing.items():
        assert job["permissions"] == {"id-token": "write"}, f"{name}: trusted publishing needs id-token: write"
        assert job["environment"]["name"] == "pypi"
        assert "build" in job["needs"]
        assert not any("password" in s.get("with", {}) for s in job["steps"]), "a token instead of trusted publishing"

    def upstream(name: str) -> set[str]:
        needs = set(jobs[name].get("needs", []))
        return needs.union(*(upstream(n) for n in needs)) if needs else needs

    (core_job,) = [name for name, dists in published.items() if CORE in dists]
    assert published[core_job] == [CORE]
    for name, dists in published.items():
        if name != core_job:
            assert core_job in upstream(name), f"{name} publishes {dists} without waiting for {core_job}"


def first_bash_block(readme: Path) -> str:
    found = re.search(r"^```bash\n(.*?)^```", readme.read_text(encoding="utf-8"), re.S | re.M)
    assert found, f"{readme} has no ```bash block"
    return found.group(1)


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheels(tmp: Path) -> Path:
    """The six wheels, in tmp/wheels: one build environment with the backends' build requirements,
    shared by the six builds (an isolated environment per build costs several times longer)."""
    builder, wheels = tmp / "build-env", tmp / "wheels"
    run([sys.executable, "-m", "venv", str(builder)])
    requires = sorted({r for d in DISTRIBUTIONS for r in pyproject(d)["build-system"]["requires"]})
    pip = [str(builder / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", "--quiet", *requires])
    run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels),
         *(str(ROOT / d) for d in DISTRIBUTIONS)])  # fmt: skip
    assert sorted(p.name.split("-")[0] for p in wheels.glob("*.whl")) == sorted(
        d.replace("-", "_") for d in DISTRIBUTIONS
    )
    return wheels


def test_readme_first_screen_installs_from_the_built_wheels_and_learns(tmp_path: Path) -> None:
    block = first_bash_block(ROOT / "README.md")
    assert re.search(r"^pip install fedplug-mlx\b", block, re.M), block
    assert re.search(r"^fedplug run mlx\b", block, re.M), block

    wheels = build_wheels(tmp_path)
    venv, report = tmp_path / "venv", tmp_path / "install-report.json"
    run([sys.executable, "-m", "venv", str(venv)])
    # the block as written, but `pip install` is the fresh environment's, finding fedplug's
    # distributions in the wheel folder (the index still serves flwr, ray, mlx and the rest);
    # --no-compile halves the install (no bytecode for all of Ray): Python compiles what the run imports
    script = re.sub(
        r"^pip install ",
        f'"{venv}/bin/pip" install --disable-pip-version-check --no-compile '
        f'--find-links "{wheels}" --report "{report}" ',
        block,
        flags=re.M,
    )
    # nothing of this checkout or of the test environment may leak in: no PYTHONPATH, no plugin settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FEDPLUG_", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv}/bin{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv))
    work = tmp_path / "work"
    work.mkdir()
    # a session of its own, so that a hung run is ended with everything it started
    shell = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = shell.communicate(timeout=540)  # within the suite's 600 s per test
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        stdout, stderr = shell.communicate()
        pytest.fail(f"the README's first screen took over 540 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert shell.returncode == 0, f"the README's first screen failed:\n{script}\n{stdout[-3000:]}\n{stderr[-3000:]}"

    # fedplug came from the wheels just built, not from an index
    installed = {
        item["metadata"]["name"]: item["download_info"]["url"] for item in json.loads(report.read_text())["install"]
    }
    ours = {name: url for name, url in installed.items() if name.startswith("fedplug")}
    assert sorted(ours) == [CORE, "fedplug-mlx"]
    assert all(url.startswith(wheels.as_uri()) for url in ours.values()), ours

    (results,) = re.findall(r"^results: (\S+)", stdout, re.M)
    rounds = json.loads((work / results / "metrics.json").read_text())["rounds"]
    first, last = rounds[0], rounds[-1]
    assert last["centralized-accuracy"] >= 0.8, rounds  # mlx's defaults learn (docs/performance.md: 89.9%)
    assert last["centralized-accuracy"] > first["centralized-accuracy"], rounds
