"""Teardown (issue 29): once the results are written, the simulation process ends Ray's processes itself (as
``ray stop --force`` does, while the plot is drawn) instead of Flower's stopping and ``ray.shutdown()``, and nothing
of the run outlives the command (the end-to-end run of ``test_run_numpy.py`` checks the fast path and that nothing is
left)."""

from __future__ import annotations

import json
import struct
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
        print(orphan, sorted(end_ray_processes()), flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    orphan, ended = done.stdout.split(" ", 1)
    assert orphan in ended
    assert not psutil.pid_exists(int(orphan))


FINISH = """
import subprocess, sys, tempfile
from pathlib import Path
from fedplug import results
from fedplug.simulation import adopt_orphans, finish_and_exit

adopt_orphans()
out, home = Path(sys.argv[1]), tempfile.mkdtemp(prefix="fedplug-test-home-")
run = results.Results(out, {"backend": "numpy"})
for number, loss in enumerate((2.3, 1.1, 0.6)):
    run.add_round({"round": number, "train-loss": loss, "train-accuracy": 0.3 * number, "evaluate-loss": loss})
# Ray's processes: a raylet-like parent with a worker that ignores SIGTERM (as Ray's actors do for seconds)
ray = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
print(ray.pid, int(ray.stdout.readline()), home, flush=True)
if len(sys.argv) > 2:  # the plot fails
    def broken(out, title):
        raise RuntimeError("no plot today")
    results.plot_metrics = broken
finish_and_exit(home, out, "fedplug numpy")
print("not reached")
"""


def _finish(out: Path, *fail: str) -> tuple[subprocess.CompletedProcess[str], list[int], Path]:
    done = subprocess.run([sys.executable, "-c", FINISH, str(out), *fail], capture_output=True, text=True, timeout=60)
    *pids, home = done.stdout.split()
    return done, [int(pid) for pid in pids], Path(home)


def test_finish_and_exit_plots_and_writes_status_while_ray_ends(tmp_path: Path) -> None:
    """The fast teardown of a run that started its own Ray (issue 29): the plot of every round is drawn, then status
    ``finished`` is written, while Ray's processes end; the process exits once both are done, leaving none of them."""
    out = tmp_path / "run"
    done, pids, home = _finish(out)
    assert done.returncode == 0, done.stderr
    assert "not reached" not in done.stdout
    assert json.loads((out / "status.json").read_text()) == {"status": "finished", "reason": ""}
    assert (out / "metrics.png").stat().st_mtime <= (out / "status.json").stat().st_mtime  # finished: plot written
    png = (out / "metrics.png").read_bytes()  # a whole PNG, 10 x 4 inches at 100 dpi
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1000, 400)
    assert png.endswith(b"IEND\xaeB`\x82")
    assert not any(psutil.pid_exists(pid) for pid in pids), "Ray's processes outlived the simulation process"
    assert not home.exists()  # the run's Flower home is removed
    timeline = json.loads((out / "timeline.json").read_text())
    assert timeline["simulation-exit"] >= (out / "status.json").stat().st_mtime - 0.01


def test_finish_and_exit_fails_the_run_in_one_line_when_the_plot_fails(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done, pids, _ = _finish(out, "fail")
    assert done.returncode == 1
    assert done.stderr.strip() == "fedplug: run failed: RuntimeError: no plot today"
    assert json.loads((out / "status.json").read_text()) == {
        "status": "failed",
        "reason": "RuntimeError: no plot today",
    }
    assert not any(psutil.pid_exists(pid) for pid in pids)
