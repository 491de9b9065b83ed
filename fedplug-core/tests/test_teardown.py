"""Teardown (issue 29): once the results are written, the simulation process ends Ray's processes itself (as
``ray stop`` does) instead of Flower's stopping and ``ray.shutdown()``, and nothing of the run outlives the command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from fedplug.testing.runs import check_results, processes_of


def test_a_finished_run_ends_rays_processes_itself_and_leaves_nothing(run_fedplug) -> None:
    _, out = run_fedplug("numpy", "--rounds", "1", "--nodes", "2", env={"FEDPLUG_PLUGINS": ""})
    assert processes_of(out) == [], "processes of the run outlived it"  # at once: no wait for a reaper
    check_results(out, ".npz")
    assert (out / "metrics.png").stat().st_size > 0 and (out / "model.npz").is_file()
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    timeline = json.loads((out / "timeline.json").read_text())
    # the fast path ran (simulation.exit_now): Ray's processes ended by the simulation process, not ray.shutdown()
    assert "simulation-exit" in timeline and "engine-stopped" not in timeline, timeline
    assert timeline["rounds-done"] <= timeline["simulation-exit"]


def test_end_ray_processes_ends_and_reaps_orphaned_descendants(tmp_path: Path) -> None:
    """A Ray worker whose raylet ended first is an orphan: adopted by the simulation process, it is ended and
    reaped there, not left to the machine's init."""
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        import psutil
        from fedplug.simulation import adopt_orphans, end_ray_processes

        adopt_orphans()
        # a parent (the raylet) that starts a child ignoring SIGTERM (a Ray worker), then is killed
        parent = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
        orphan = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        while psutil.Process(orphan).ppid() != psutil.Process().pid:
            time.sleep(0.01)
        print(orphan, sorted(end_ray_processes(grace=0.2)), flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    orphan, ended = done.stdout.split(" ", 1)
    assert orphan in ended
    assert not psutil.pid_exists(int(orphan))
