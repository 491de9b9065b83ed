"""The one process supervisor of fedplug's commands, for both engines.

Every process a fedplug command starts (the Simulation Engine's process, Flower's
SuperLink and SuperNode, the ``flwr`` CLI) runs in a process group of its own, with a mark
in its environment; when the command's block ends, however it ends (success, error,
Ctrl-C, SIGTERM, SIGHUP), :meth:`Processes.stop` ends each group and every process that
carries the mark: SIGINT first (Flower and Ray shut down cleanly), then SIGTERM, then
SIGKILL for what is left. A process started with ``force_quit_after`` (Flower's SuperLink, a
uvicorn server that waits for every open connection to close, such as a run's log stream) gets
a second SIGINT after that many seconds: its documented "Ctrl-C again to force quit". Signals
that arrive while the processes are being stopped do not cut the stopping short. Flower's
state goes to a temporary ``FLWR_HOME``, never ``~/.flwr``, removed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK = "FEDPLUG_DEPLOY_ID"
"""Set in the environment of every process a fedplug command starts, to find them all at the end."""
FLWR_HOME_PREFIX = "fedplug-flwr-"
"""Flower's state of a command goes to a temporary folder of this prefix, removed when the command ends."""


class Stopped(KeyboardInterrupt):
    """The command got SIGINT, SIGTERM or SIGHUP: stop what it started, as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` in this block (even when SIGINT was inherited ignored,
    as in a shell's background job); the previous handlers come back after it. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def flower_bin(name: str) -> str:
    """A Flower command of this environment (next to the running Python)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else name


@dataclass
class Processes:
    """Processes started by one fedplug command, each in its own process group, all stopped at the end.

    Flower's SuperLink and SuperNode start their SuperExec in a new session, and the
    SuperExec starts the app processes: :meth:`stop` also ends every descendant and every
    process that carries this command's mark in its environment.
    """

    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    force_quit: dict[int, float] = field(default_factory=dict)
    """Seconds after the first SIGINT at which a process (by pid) gets a second one."""
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=FLWR_HOME_PREFIX)))
    extra_env: dict[str, str] = field(default_factory=lambda: {"COLUMNS": "400"})
    """Set for every process started; by default Flower's commands print each message on one line."""

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            MARK: self.mark,
            **self.extra_env,
            **(extra or {}),
        }

    def start(
        self,
        command: list[str],
        log: Path | int | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        keep_stdout: bool = False,
        keep_stderr: bool = False,
        force_quit_after: float | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` in a new process group, its output to ``log`` (a file, appended, or a pipe).

        ``keep_stdout``/``keep_stderr``: that stream stays this command's own (the terminal) instead.
        ``force_quit_after``: when stopped, it gets a second SIGINT after that many seconds (see the module).
        """
        file = None
        if isinstance(log, Path):
            log.parent.mkdir(parents=True, exist_ok=True)
            file = open(log, "ab")  # noqa: SIM115 - closed below, once the child has it
        sink: Any = file if file is not None else log
        try:
            process = subprocess.Popen(
                command,
                stdout=None if keep_stdout else sink,
                stderr=None if keep_stderr else (sink if keep_stdout else subprocess.STDOUT),
                env=self.env(env),
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if file is not None:
                file.close()
        self.started.append(process)
        if force_quit_after is not None:
            self.force_quit[process.pid] = force_quit_after
        return process

    def members(self) -> list[Any]:
        import psutil

        found: dict[int, psutil.Process] = {}
        for process in self.started:
            with suppress(psutil.Error):
                parent = psutil.Process(process.pid)
                found[parent.pid] = parent
                found.update({child.pid: child for child in parent.children(recursive=True)})
        for proc in psutil.process_iter():
            with suppress(psutil.Error):
                if proc.pid != os.getpid() and proc.environ().get(MARK) == self.mark:
                    found[proc.pid] = proc
        return list(found.values())

    def stop(self, grace: float = 15.0) -> None:
        """SIGINT to each process group, SIGTERM after ``grace`` seconds, then SIGKILL for what is left.

        In the main thread, SIGINT, SIGTERM and SIGHUP are ignored meanwhile: a second Ctrl-C must not
        leave Flower's processes running by interrupting their stopping.
        """
        with _deferred_signals():
            self._stop(grace)

    def _stop(self, grace: float) -> None:
        import psutil

        members = self.members()
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0)):
            running = [process for process in self.started if process.poll() is None]
            if not running:
                break
            for process in running:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, sig)
            deadline = time.monotonic() + wait
            if sig == signal.SIGINT:
                self._force_quit(running, deadline)
            for process in running:
                with suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
        members = [m for m in {m.pid: m for m in [*members, *self.members()]}.values() if m.is_running()]
        for proc in members:  # what the started processes left behind (Flower's SuperExec and app processes, Ray's)
            with suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(members, timeout=3.0)
        for proc in alive:
            with suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        for process in self.started:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
        shutil.rmtree(self.home, ignore_errors=True)

    def _force_quit(self, running: list[subprocess.Popen[bytes]], deadline: float) -> None:
        """A second SIGINT to each process that asks for one and still runs ``force_quit`` seconds after the first."""
        began = time.monotonic()
        for process in sorted(running, key=lambda p: self.force_quit.get(p.pid, float("inf"))):
            if process.pid not in self.force_quit:
                continue
            when = min(deadline, began + self.force_quit[process.pid])
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, when - time.monotonic()))
                continue
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGINT)


@contextmanager
def _deferred_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored in this block (main thread only); the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def supervised(extra_env: dict[str, str] | None = None) -> Iterator[Processes]:
    """Processes that are all gone when the block ends; SIGINT, SIGTERM and SIGHUP raise :class:`Stopped` in it."""
    group = Processes() if extra_env is None else Processes(extra_env=extra_env)
    try:
        with stop_signals():
            yield group
    finally:
        group.stop()
