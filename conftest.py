"""Every distribution's tests share fedplug's end-to-end helpers (the ``run_fedplug`` fixture).

And no test may write to the user's ``~/.flwr`` (Flower's default home): the suite fails if
anything under it was created, changed or removed while it ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["fedplug.testing.runs"]

FLWR_HOME = Path.home() / ".flwr"
BEFORE = pytest.StashKey[dict[str, float]]()


def flwr_home_state() -> dict[str, float]:
    """Every path under ``~/.flwr`` with its modification time."""
    if not FLWR_HOME.exists():
        return {}
    return {str(path): path.stat().st_mtime for path in [FLWR_HOME, *FLWR_HOME.rglob("*")]}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[BEFORE] = flwr_home_state()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller checks once, at the end
        return
    before, after = session.config.stash[BEFORE], flwr_home_state()
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"FAILED: tests wrote to the user's {FLWR_HOME}: {', '.join(changed[:5])}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
