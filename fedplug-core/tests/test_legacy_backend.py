"""A backend written against fedplug 0.1's contract keeps working until 0.3, with a ``DeprecationWarning``.

The backend is tests/plugins/fedplug-legacy-example: the module `fedplug new-backend`
generated in fedplug 0.1, kept as it was (its operations defined on the Backend subclass).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedplug.testing.runs import fedplug

SUITE = """\
from fedplug.testing import BackendConformance


class TestLegacyExample(BackendConformance):
    backend_name = "legacy_example"
"""
ONLY = {"FEDPLUG_PLUGINS": "legacy_example"}


def test_it_is_listed_and_warns_its_developers_not_its_users() -> None:
    quiet = fedplug("list", "--json", env=ONLY)
    assert quiet.returncode == 0 and '"legacy_example"' in quiet.stdout
    assert quiet.stderr == ""  # Python shows DeprecationWarnings to developers (tests, -W), not to users
    shown = fedplug("list", "--json", env={**ONLY, "PYTHONWARNINGS": "default::DeprecationWarning"})
    assert shown.returncode == 0
    (line,) = [line for line in shown.stderr.splitlines() if "DeprecationWarning: fedplug_legacy" in line]
    assert "fedplug_legacy_example/__init__.py" in line  # at the class statement of the plugin
    assert "DeprecationWarning: fedplug_legacy_example.LegacyExampleBackend defines the operations itself" in line
    assert "removed in fedplug 0.3" in line and "implementation = 'module:Class'" in line


def test_it_still_passes_the_conformance_suite(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep the repository's pytest settings out
    (tmp_path / "test_legacy_example.py").write_text(SUITE)
    env = {**os.environ, **ONLY}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, f"the 0.1-style backend fails the suite:\n{done.stdout[-4000:]}"
    assert " passed" in done.stdout and "failed" not in done.stdout
    assert "DeprecationWarning: fedplug_legacy_example.LegacyExampleBackend" in done.stdout  # its developers see it
    assert "removed in fedplug 0.3" in done.stdout
