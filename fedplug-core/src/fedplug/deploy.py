"""fedplug on Flower's Deployment Engine: a SuperLink, SuperNodes with node-local data, runs.

Every process here is Flower's own: ``flower-superlink``, ``flower-supernode`` and the
``flwr`` CLI (``flwr supernode register``, ``flwr run --stream``, ``flwr stop``). fedplug
checks what it can before starting them, gives them the right flags (TLS and SuperNode
authentication by default), keeps Flower's state in a temporary ``FLWR_HOME`` (never
``~/.flwr``) and stops every process it started when the command ends, whatever the cause.

Data never leaves its node: a SuperNode's node config names its own data file
(``data=...``), and the ClientApp trains on that file as the node's whole data
(:func:`load_local`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedplug.backend import Config, Scalar

DEFAULT_PORT = 9092
"""The SuperLink's one port (Fleet, Control and Runtime APIs); Flower's own default is 8000."""
CERTIFICATES = Path("fedplug-certificates")
MARK = "FEDPLUG_DEPLOY_ID"
"""Set in the environment of every process a fedplug command starts, to find them all at the end."""
CONNECTION = "fedplug"
"""Name of the SuperLink connection in the temporary FLWR_HOME of ``flwr`` commands."""


class DeployError(ValueError):
    """Bad input for a deployment command; the message says what to do."""


# ---------------------------------------------------------------- node-local data


def load_local(config: Config, path: str) -> Any:
    """A node's own data file or folder as the node's whole data, split train/test.

    :func:`fedplug.data.load_local` splits it with the run's ``test-fraction`` and ``seed``;
    here the data must also have the shape and classes of the run's dataset (``dataset``
    decides the model's input).
    """
    from fedplug.data import DataError, data_spec
    from fedplug.data import load_local as load_whole_file

    part = load_whole_file(config, path)
    expected = data_spec(config)
    shape = tuple(part.x_train.shape[1:])
    largest = int(max(part.y_train.max(initial=0), part.y_test.max(initial=0)))
    if shape != tuple(expected.input_shape) or largest >= expected.num_classes:
        raise DataError(
            f"this node's data {path} has images {shape} and labels up to {largest}, but the run's dataset "
            f"'{config['dataset']}' has images {tuple(expected.input_shape)} and {expected.num_classes} classes"
        )
    return part


def node_run_config(run_config: Config, node_config: Config) -> dict[str, Scalar]:
    """The run config as this node runs it: its own backend and data columns.

    The node's backend is its node config's ``backend``, else its partition's entry in the
    run config's ``node-backends``, else the run config's ``backend``. Backends share the
    ``mlp`` and ``lenet`` weight layouts, so a node may train with another framework than
    the ServerApp's; keys the node's backend does not know are dropped.
    """
    config = dict(run_config)
    for key in ("image-column", "label-column"):
        if node_config.get(key):
            config[key] = node_config[key]
    from fedplug.node_backends import backend_of

    backend = backend_of(config, node_config)  # node config > run config node-backends > run config backend
    if backend != config.get("backend"):
        from fedplug.config import PREFIXES, defaults_for
        from fedplug.custom import check_same_backend

        check_same_backend(config, backend)  # a custom model's weights have no canonical layout
        from fedplug.plugins import get_backend

        known = defaults_for(get_backend(backend))
        config = {k: v for k, v in config.items() if k in known or k.startswith(PREFIXES)}
        config["backend"] = backend
    return config


def node_data(config: Config, node_config: Config) -> Any:
    """This node's data: its own file (node config ``data``) or a partition (``partition-id``)."""
    from fedplug.data import EMBEDDED, load_partition

    data = str(node_config.get("data", ""))
    if data and data != EMBEDDED:
        return load_local(config, data)
    if data == EMBEDDED:
        config = {**config, "dataset": EMBEDDED}
    return load_partition(config, int(node_config["partition-id"]), int(node_config["num-partitions"]))


def check_node(backend_name: str, node_config: dict[str, Scalar]) -> str:
    """Load this node's data with the backend's defaults; a one-line description, or DataError."""
    from fedplug.config import resolve
    from fedplug.plugins import get_backend

    backend = get_backend(backend_name)
    config = resolve(backend, {})
    part = node_data(node_run_config(config, node_config), node_config)
    classes = len(set(part.y_train.tolist()) | set(part.y_test.tolist()))
    return (
        f"{len(part.y_train)} training and {len(part.y_test)} test images {tuple(part.x_train.shape[1:])}, "
        f"{classes} classes present"
    )


# ---------------------------------------------------------------- processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DeployError(f"'{address}' is not HOST:PORT (e.g. coordinator.example.org:{DEFAULT_PORT})")
    return host.strip("[]"), int(port)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port), timeout):
            return True
    except OSError:
        return False


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
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fedplug-flwr-")))

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "COLUMNS": "400",  # the flwr CLI's messages on one line each
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            MARK: self.mark,
            **(extra or {}),
        }

    def start(
        self, command: list[str], log: Path | int | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        if isinstance(log, Path):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as file:
                process = subprocess.Popen(
                    command, stdout=file, stderr=subprocess.STDOUT, env=self.env(), cwd=cwd, start_new_session=True
                )
        else:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=cwd, start_new_session=True
            )
        self.started.append(process)
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

    def stop(self, grace: float = 10.0) -> None:
        """SIGINT to each process group (Flower shuts down cleanly), then SIGKILL for what is left."""
        import psutil

        members = self.members()
        for process in self.started:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGINT)
        deadline = time.monotonic() + grace
        for process in self.started:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        members = [m for m in {m.pid: m for m in [*members, *self.members()]}.values() if m.is_running()]
        _, alive = psutil.wait_procs(members, timeout=max(0.1, min(3.0, deadline - time.monotonic())))
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def processes() -> Iterator[Processes]:
    """Processes that are all gone when the block ends (success, error, Ctrl-C or SIGTERM)."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill`, systemd stop: clean up as for Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    group = Processes()
    try:
        yield group
    finally:
        group.stop()


def last_error(log: Path, lines: int = 3) -> str:
    """The reason Flower printed last in ``log``: the lines after its last ``ERROR``."""
    text = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in _read(log).splitlines()]
    text = [line for line in text if line]
    starts = [i for i, line in enumerate(text) if line.startswith("ERROR")]
    if not starts:
        return ""
    chosen = text[starts[-1] : starts[-1] + lines + 1]
    reasons = [line.removeprefix("ERROR").strip(" :") for line in chosen if "Exit Code" not in line]
    return " ".join(line for line in reasons if not line.startswith(("INFO", "For more information")))


# ---------------------------------------------------------------- TLS files and connections


@dataclass(frozen=True)
class Security:
    """How a client reaches the SuperLink: a CA certificate, or no TLS at all."""

    ca_cert: Path | None
    insecure: bool = False

    @classmethod
    def of(cls, ca_cert: Path | None, insecure: bool) -> Security:
        if insecure:
            return cls(None, True)
        ca = ca_cert or CERTIFICATES / "ca.crt"
        if not ca.is_file():
            raise DeployError(
                f"CA certificate {ca} not found: pass --ca-cert PATH (the federation's ca.crt), "
                "or --insecure for a SuperLink started with --insecure"
            )
        return cls(ca.expanduser().resolve())


def superlink_files(folder: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, superlink.crt, superlink.key) of a certificates folder, or DeployError."""
    files = tuple(folder / name for name in ("ca.crt", "superlink.crt", "superlink.key"))
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise DeployError(
            f"missing {', '.join(missing)}: make them with `fedplug certificates {folder} --host HOST`, "
            "or start with --insecure on a trusted network"
        )
    return files  # type: ignore[return-value]


def write_connection(home: Path, address: str, security: Security) -> None:
    """A SuperLink connection named ``fedplug`` in ``home/config.toml``, for the ``flwr`` CLI."""
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {json.dumps(address)}",
    ]
    if security.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(security.ca_cert))}")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def node_config_text(values: dict[str, Scalar]) -> str:
    """``--node-config`` syntax: ``key="text" key=3``."""
    return " ".join(f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in values.items())


# ---------------------------------------------------------------- commands


def superlink_command(
    host: str, port: int, certificates: tuple[Path, Path, Path] | None, node_auth: bool, database: Path | None
) -> list[str]:
    command = [flower_bin("flower-superlink"), "--host", host, "--port", str(port)]
    if database is not None:  # Flower's state (registered SuperNodes, runs) kept across restarts
        command += ["--database", str(database.expanduser().resolve())]
    # the ServerApp runs in this environment, where fedplug and the backends are installed
    command.append("--disable-runtime-dependency-installation")
    if certificates is None:
        command.append("--insecure")
    else:
        ca, cert, key = certificates
        command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        if node_auth:
            command.append("--enable-supernode-auth")
    return command


def supernode_command(
    superlink: str, security: Security, key: Path | None, node_config: dict[str, Scalar], runtime_port: int
) -> list[str]:
    command = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(runtime_port)]
    command += ["--node-config", node_config_text(node_config)]
    if security.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(security.ca_cert)]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    return command


def wait_for(condition: Callable[[], bool], timeout: float, process: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll ``condition`` until true, ``timeout`` seconds pass or ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return condition()
        time.sleep(0.2)
    return False


def register(keys: list[Path], superlink: str, security: Security, echo: Callable[[str], None]) -> int:
    """Register SuperNode public keys on a running SuperLink with ``flwr supernode register``."""
    from fedplug.certificates import check_public_key

    for key in keys:
        try:
            check_public_key(key)
        except ValueError as error:
            raise DeployError(str(error)) from error
    with processes() as group:
        write_connection(group.home, superlink, security)
        for key in keys:
            done = subprocess.run(
                [flower_bin("flwr"), "supernode", "register", str(key.resolve()), CONNECTION, "--format", "json"],
                capture_output=True,
                text=True,
                env=group.env(),
                timeout=120,
            )
            answer = _last_json(done.stdout)
            if done.returncode or not answer.get("success"):
                reason = (done.stderr.strip() or done.stdout.strip()).splitlines()
                echo(f"fedplug: error: cannot register {key}: {reason[-1] if reason else 'no answer'}")
                return 1
            echo(f"registered {key} as SuperNode {answer['node-id']}")
    return 0


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        with suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    with suppress(ValueError):
        start = text.index("{")
        value = json.loads(text[start:])
        if isinstance(value, dict):
            return value
    return {}


@dataclass
class Submission:
    """What ``flwr run --stream`` told about a submitted run."""

    run_id: int | None = None
    out: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    code: int = 0


def submit(
    app_dir: Path,
    superlink: str,
    security: Security,
    on_round: Callable[[dict[str, Any]], None],
    on_results: Callable[[str], None],
    log: TextIO,
) -> Submission:
    """Submit the Flower App ``app_dir`` to the SuperLink and follow its log stream to the end.

    Ctrl-C stops the run on the SuperLink (``flwr stop``) before it is passed on.
    """
    from fedplug.deploy_app import PROGRESS, RESULTS

    result = Submission()
    with processes() as group:
        write_connection(group.home, superlink, security)
        process = group.start([flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"], log=subprocess.PIPE)
        box: list[str] | None = None
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                text = line.strip()
                if PROGRESS.strip() in text:
                    record = json.loads(text.split(PROGRESS, 1)[1])
                    result.rounds.append(record)
                    on_round(record)
                elif RESULTS.strip() in text:
                    result.out = json.loads(text.split(RESULTS, 1)[1])["out"]
                    on_results(result.out)
                elif "Successfully started run" in text:
                    result.run_id = int(text.split("Successfully started run", 1)[1].split()[0])
                elif text.startswith("╭─ Error"):  # the flwr CLI's error box: its lines are one message
                    box = []
                elif box is not None and text.startswith("│"):
                    box.append(text.strip("│ "))
                elif box is not None:
                    result.errors.append(" ".join(box))
                    box = None
                elif "ERROR" in text or "Error" in text or "Exception" in text:
                    result.errors.append(text)
            if box:
                result.errors.append(" ".join(box))
            result.code = process.wait()
        except KeyboardInterrupt:
            if result.run_id is not None:
                subprocess.run(
                    [flower_bin("flwr"), "stop", str(result.run_id), CONNECTION],
                    capture_output=True,
                    env=group.env(),
                    timeout=60,
                    check=False,
                )
            raise
    return result


# ---------------------------------------------------------------- what the commands do


def serve_superlink(
    host: str,
    port: int,
    certificates: Path,
    insecure: bool,
    node_auth: bool,
    database: Path | None,
    log: Path,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    """``fedplug superlink``: Flower's SuperLink in the foreground until Ctrl-C; returns the exit code."""
    files = None if insecure else tuple(p.expanduser().resolve() for p in superlink_files(certificates))
    if insecure:
        warn(
            "fedplug: WARNING: --insecure: no TLS and no SuperNode authentication. Everything between the "
            "SuperLink, the SuperNodes and `fedplug run` travels unencrypted and any machine that reaches "
            "this port can join. Use it only on a trusted lab network."
        )
    elif not node_auth:
        warn("fedplug: WARNING: --no-node-auth: any SuperNode that trusts the CA can join, registered or not.")
    shown = host if host not in ("0.0.0.0", "::") else "HOST"
    ca = "--insecure" if insecure else f"--ca-cert {files[0]}"  # type: ignore[index]
    with processes() as group:
        process = group.start(
            superlink_command(host, port, files, node_auth and not insecure, database),  # type: ignore[arg-type]
            log=log,
        )
        if not wait_for(lambda: port_open(host, port), timeout=120, process=process):
            reason = last_error(log) or f"it did not open port {port}"
            warn(f"fedplug: error: the SuperLink did not start: {reason} (log: {log})")
            return 1
        security = "TLS" if insecure is False else "no TLS"
        auth = "SuperNode authentication on" if node_auth and not insecure else "SuperNode authentication off"
        echo(f"fedplug: SuperLink ready on {host}:{port} · {security} · {auth} · Flower's log: {log}")
        if node_auth and not insecure:
            echo(f"  register each SuperNode:  fedplug register supernode-I.pub --superlink {shown}:{port} {ca}")
        echo(f"  data owners join with:    fedplug supernode BACKEND --superlink {shown}:{port} {ca} --data PATH ...")
        echo(f"  submit a run:             fedplug run BACKEND --superlink {shown}:{port} {ca}")
        echo(f"  results are written here: {Path('fedplug-runs').resolve()}/<time>-<backend> (unless --out)")
        echo(f"  open TCP port {port} to the data owners and to who submits runs, to no one else. Ctrl-C stops.")
        try:
            code = process.wait()
        except KeyboardInterrupt:
            echo("fedplug: stopping the SuperLink ...")
            return 130
        reason = last_error(log) or f"exit code {code}"
        warn(f"fedplug: error: the SuperLink stopped: {reason} (log: {log})")
        return 1


def serve_supernode(
    backend_name: str,
    superlink: str,
    node_config: dict[str, Scalar],
    security: Security,
    key: Path | None,
    runtime_port: int,
    log: Path,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    """``fedplug supernode``: Flower's SuperNode with this node's config until Ctrl-C or refusal."""
    with processes() as group:
        process = group.start(supernode_command(superlink, security, key, node_config, runtime_port), log=log)
        echo(f"fedplug: connecting to the SuperLink {superlink} (Flower's log: {log}) ...")
        connected = wait_for(lambda: "SuperNode ID:" in _read(log), timeout=1e9, process=process)
        if connected:
            node_id = _read(log).split("SuperNode ID:", 1)[1].split()[0]
            echo(f"fedplug: connected to {superlink} as SuperNode {node_id}; waiting for runs (Ctrl-C leaves)")
        try:
            code = process.wait()
        except KeyboardInterrupt:
            echo("fedplug: leaving the federation ...")
            return 130
        reason = last_error(log) or f"exit code {code}"
        if not connected:
            hint = (
                "is its public key registered on the SuperLink, and is --ca-cert the federation's CA?"
                if not security.insecure
                else "does the SuperLink run with --insecure?"
            )
            warn(f"fedplug: error: the SuperLink at {superlink} refused this SuperNode: {reason}; {hint} (log: {log})")
        else:
            warn(f"fedplug: error: the SuperNode stopped: {reason} (log: {log})")
        return 1


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""
