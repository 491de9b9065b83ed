"""``fedplug new-backend`` and ``fedplug new-strategy``: generate a separately installable plugin project.

The project is filled in from the template files in ``fedplug/templates/backend/`` or
``fedplug/templates/strategy/`` (``string.Template``: ``$name`` is the plugin's name, ``$$`` a
literal dollar sign). A backend's descriptor (``__init__.py``) names an implementation
(``impl.py``) that delegates to the built-in NumPy backend, so it installs, passes the
conformance suite and runs with no framework; the author then replaces it piece by piece. A
strategy's is FedAvg with a server learning rate, passing the strategy suite.
"""

from __future__ import annotations

import keyword
import re
from importlib.resources import files
from pathlib import Path
from string import Template

from fedplug.version import __version__

KINDS = ("backend", "strategy")
TEMPLATES = files("fedplug") / "templates"
FILES = {
    "pyproject.toml": "pyproject.toml.tmpl",
    "README.md": "README.md.tmpl",
    "src/fedplug_{name}/__init__.py": "plugin.py.tmpl",
    "src/fedplug_{name}/impl.py": "impl.py.tmpl",
    "tests/test_conformance.py": "test_conformance.py.tmpl",
}
"""Generated file (relative to the project folder) -> its template."""
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*[a-z0-9]|[a-z]")
"""Lowercase, starting with a letter, not ending with ``_`` (a valid distribution name)."""


class ScaffoldError(ValueError):
    """The project cannot be created; the message says what to do instead."""


def check_name(name: str, installed: set[str], kind: str = "backend") -> None:
    """Raise ``ScaffoldError`` unless ``name`` can name a new backend (or strategy: ``kind``)."""
    if not name.isidentifier():
        raise ScaffoldError(
            f"{kind} name '{name}' is not a valid Python identifier: use letters, digits and _, e.g. 'mything'"
        )
    if keyword.iskeyword(name):
        raise ScaffoldError(f"{kind} name '{name}' is a Python keyword: choose another name, e.g. '{name}_{kind}'")
    if not NAME_PATTERN.fullmatch(name):
        raise ScaffoldError(
            f"{kind} name '{name}' must be lowercase ASCII letters, digits and _, start with a letter "
            "and not end with _, e.g. 'mything'"
        )
    if name in installed:
        raise ScaffoldError(f"a {kind} named '{name}' is already installed (see `fedplug list`): choose another name")
    if name == "core":
        raise ScaffoldError(
            f"{kind} name 'core' would make the distribution fedplug-core, which is fedplug itself: choose another name"
        )


def render(template: str, name: str, kind: str = "backend") -> str:
    """Fill in one template for the backend (or strategy: ``kind``) ``name``."""
    text = (TEMPLATES / kind / template).read_text(encoding="utf-8")
    major, minor = __version__.split(".")[:2]
    title = "".join(part.capitalize() for part in name.split("_"))
    return Template(text).substitute(
        name=name,
        distribution=f"fedplug-{name.replace('_', '-')}",
        package=f"fedplug_{name}",
        cls=f"{title}Backend" if kind == "backend" else f"{title}Strategy",
        impl_cls=f"{title}Implementation",
        core_requirement=f"fedplug-core>={major}.{minor},<{major}.{int(minor) + 1}",
    )


def scaffold(name: str, directory: Path, installed: set[str], kind: str = "backend") -> Path:
    """Create the plugin project for backend (or strategy: ``kind``) ``name`` in ``directory``; return its path.

    ``installed`` holds the names of the backends (strategies) installed here, which ``name``
    must not clash with. ``directory`` must not exist or be empty.
    """
    check_name(name, installed, kind)
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} already exists and is not empty: choose a new or empty directory")
    for relative, template in FILES.items():
        path = target / relative.format(name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(template, name, kind), encoding="utf-8")
    return target
