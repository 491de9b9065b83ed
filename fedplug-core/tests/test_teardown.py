"""Teardown (issue 29): once the results are written, the simulation process ends Ray's processes itself (as
``ray stop`` does) instead of Flower's stopping and ``ray.shutdown()``, and nothing of the run outlives the command
(the end-to-end run of ``test_run_numpy.py`` checks the fast path and that nothing is left)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import psutil


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
