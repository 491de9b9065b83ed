"""The Flower App of a run: a folder with a ``pyproject.toml`` naming fedplug's apps and the run's config.

The Simulation Engine runs it as ``flwr run`` would; the results keep a portable copy
(``flower-app/``) that runs with plain ``flwr run`` on any SuperLink; ``fedplug run
--superlink`` submits one.
"""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path

from fedplug.backend import Scalar
from fedplug.plugins import get_registry


def pinned_requirements(backend: str) -> list[str]:
    """The distributions a run needs, pinned to the versions running now."""
    from importlib import metadata

    from packaging.requirements import Requirement

    entry = get_registry().backends[backend]
    names = ["flwr", "fedplug-core", entry.distribution]
    with suppress(Exception):  # the framework, when it is an installed distribution
        names.append(Requirement(entry.backend.framework.requirement).name)
    pinned: dict[str, str] = {}
    for name in names:
        with suppress(metadata.PackageNotFoundError):
            pinned.setdefault(metadata.distribution(name).metadata["Name"].lower(), metadata.version(name))
    return [f"{name}=={version}" for name, version in pinned.items()]


def portable_config(config: dict[str, Scalar]) -> dict[str, Scalar]:
    """``config`` without the writing machine's absolute paths.

    ``out`` becomes empty (the ServerApp writes ``./fedplug-runs/<time>-<backend>`` where it
    runs) and a local dataset path becomes relative to the current directory.
    """
    portable = dict(config)
    portable["out"] = ""
    dataset = str(config.get("dataset", ""))
    if dataset and Path(dataset).is_absolute():
        portable["dataset"] = os.path.relpath(dataset)
    return portable


def carry_module(app_dir: Path, config: dict[str, Scalar], relative: bool) -> str:
    """Copy a custom model's module (file, or top-level package) into the app; its ``model-file`` there.

    Flower puts an app's folder on ``sys.path`` when it loads it, so the module imports by name
    on any SuperLink and SuperNode; ``relative`` gives the path inside the app (a portable app).
    """
    file = Path(str(config["model-file"]))
    module = str(config["model"]).rpartition(":")[0]
    if not file.is_file():  # a stored run whose module was moved: the app carries what it can
        return str(config["model-file"])
    parts = module.split(".")
    depth = len(parts) - (0 if file.name == "__init__.py" else 1)
    root = file.parents[depth]
    top = root / parts[0]
    if top.is_dir():
        shutil.copytree(top, app_dir / parts[0], dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(file, app_dir / file.name)
    return str(file.relative_to(root)) if relative else str(file)


def write_flower_app(
    out: Path,
    config: dict[str, Scalar],
    portable: bool = True,
    serverapp: str = "fedplug.apps:server_app",
) -> Path:
    """Write a Flower App whose components are fedplug's apps and whose config is ``config``.

    ``portable``: without absolute paths of this machine (:func:`portable_config`), so
    that it runs with plain ``flwr run`` on any SuperLink; its dependencies are pinned to
    the versions that run here.
    """
    import tomli_w

    app_dir = out / "flower-app"
    app_dir.mkdir(parents=True, exist_ok=True)
    backend = str(config["backend"])
    if portable:
        config = portable_config(config)
    if config.get("model-file"):
        config = {**config, "model-file": carry_module(app_dir, config, relative=portable)}
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": f"fedplug-{backend.replace('_', '-')}-run",
            "version": "1.0.0",
            "description": f"fedplug {backend} run: fedplug.apps with this run's config",
            "license": "Apache-2.0",
            "dependencies": pinned_requirements(backend),
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedplug",
                    "components": {"serverapp": serverapp, "clientapp": "fedplug.apps:client_app"},
                    "config": dict(config),
                }
            }
        },
    }
    header = (
        "# A Flower App running fedplug's apps with this run's config.\n"
        "# Deployment Engine: flwr run <this folder> <your-superlink-connection>\n"
    )
    (app_dir / "pyproject.toml").write_text(header + tomli_w.dumps(project), encoding="utf-8")
    return app_dir
