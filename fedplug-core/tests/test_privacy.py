"""fedplug never phones home and leaves nothing behind: one verbose run on a local csv with Unicode everywhere.

The run uses a fresh HOME and a fresh TMPDIR, a results folder and a label column whose
names hold non-ASCII characters and an emoji (they reach the Flower App's TOML and every
node), and ``--verbose`` (Flower's and Ray's logs on the terminal). While it runs, every
process of the run is checked for telemetry switched off; afterwards, nothing exists under
``~/.flwr`` and no temporary Flower home is left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import psutil

from fedplug.testing.runs import check_results

TELEMETRY_OFF = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
ALWAYS = {**TELEMETRY_OFF, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
LABEL = "étiquette🏷️"


def write_csv(path: Path, rows: int = 240) -> None:
    """Tabular 8x8 grey images of three classes, each class a brighter or darker blob."""
    rng = np.random.default_rng(0)
    labels = np.arange(rows) % 3
    pixels = rng.integers(0, 60, (rows, 64)) + labels[:, None] * 80
    header = ",".join([*(f"p{i}" for i in range(64)), LABEL])
    lines = [",".join([*map(str, row), str(label)]) for row, label in zip(pixels, labels)]
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")


def marked_environments(marker: str) -> dict[int, tuple[str, dict[str, str]]]:
    """pid -> (command line, environment) of the live processes of the run marked by ``marker``."""
    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            env = proc.environ()
            if env.get("FEDPLUG_PRIVACY_RUN") == marker:
                found[proc.pid] = (" ".join(proc.info["cmdline"] or [])[:100], env)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_verbose_run_on_a_local_csv_writes_nothing_under_home_and_cleans_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    tmpdir = Path(f"/tmp/fp-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths live under it
    tmpdir.mkdir()
    data = tmp_path / "données 📊.csv"
    write_csv(data)
    out = tmp_path / "résultats 🚀"
    marker = uuid.uuid4().hex
    env = {
        **os.environ,
        "HOME": str(home),
        "TMPDIR": str(tmpdir),
        "FEDPLUG_PLUGINS": "",
        "FEDPLUG_PRIVACY_RUN": marker,
        "FLWR_TELEMETRY_ENABLED": "1",  # fedplug switches it off whatever the user's environment says
    }
    command = [str(Path(sys.executable).with_name("fedplug")), "run", "numpy", "--verbose", "--out", str(out)]
    command += ["--nodes", "2", "--rounds", "2", "--dataset", str(data)]
    command += ["--run-config", f"hidden-dims='32' label-column='{LABEL}'"]
    seen: dict[int, tuple[str, dict[str, str]]] = {}
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.monotonic() + 900
        while process.poll() is None and time.monotonic() < deadline:
            seen.update(marked_environments(marker))
            time.sleep(0.5)
        output = process.communicate(timeout=60)[0]
        assert process.returncode == 0, output[-3000:]
        rounds = check_results(out, ".npz")
        assert [r["round"] for r in rounds] == [0, 1, 2]
        app = tomllib.loads((out / "flower-app" / "pyproject.toml").read_text(encoding="utf-8"))
        assert app["tool"]["flwr"]["app"]["config"]["label-column"] == LABEL
        assert app["tool"]["flwr"]["app"]["config"]["out"] == ""  # the exported app is portable
        stored = json.loads((out / "config.json").read_text())
        assert stored["label-column"] == LABEL and stored["out"] == str(out.resolve())
        assert any("raylet" in line for line, _ in seen.values()), "Ray's processes were not seen"
        assert "INFO" in output, "--verbose shows Flower's logs"
        # /proc shows a process's environment as it started: the command's own changes show in its children
        children = {pid: seen[pid] for pid in seen if pid != process.pid}
        assert any("fedplug.simulation" in line for line, _ in children.values())
        for line, process_env in children.values():
            # the command's own children (the simulation process, and the watcher that removes the run's copy of
            # the data whatever ends the command) have telemetry off; the simulation process sets
            # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO itself, for Ray's processes
            own_child = "fedplug.simulation" in line or " -I -S -c " in line  # the watcher: python -I -S -c SCRIPT
            expected = TELEMETRY_OFF if own_child else ALWAYS
            for key, value in expected.items():
                assert process_env.get(key) == value, f"{key} is {process_env.get(key)!r} in: {line}"
        assert not (home / ".flwr").exists(), "fedplug wrote to ~/.flwr"
        assert list(tmpdir.glob("fedplug-flwr-*")) == [], "the run left its temporary Flower home behind"
        assert marked_environments(marker) == {}, "processes of the run outlived it"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
