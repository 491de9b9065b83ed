"""Flower's own commands, as fedplug starts them: ``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI.

fedplug checks what it can before starting them and gives them the right flags (TLS and
SuperNode authentication by default). The ``flwr`` CLI runs with a temporary
``FLWR_HOME`` holding one SuperLink connection (never the user's ``~/.flwr``), and its
answers are read in its JSON format (``--format json``); a submitted run's progress is
read from fedplug's structured status lines in the run's log stream, never from Flower's text.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedplug.backend import Scalar
from fedplug.deployment.certificates import check_public_key
from fedplug.deployment.processes import Processes, flower_bin, supervised
from fedplug.errors import DeployError, one_line
from fedplug.status_lines import parse_line

CERTIFICATES = Path("fedplug-certificates")
CONNECTION = "fedplug"
"""Name of the SuperLink connection in the temporary FLWR_HOME of ``flwr`` commands."""


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
    ca, cert, key = (folder / name for name in ("ca.crt", "superlink.crt", "superlink.key"))
    missing = [str(path) for path in (ca, cert, key) if not path.is_file()]
    if missing:
        raise DeployError(
            f"missing {', '.join(missing)}: make them with `fedplug certificates {folder} --host HOST`, "
            "or start with --insecure on a trusted network"
        )
    return ca, cert, key


def write_connection(home: Path, address: str, security: Security) -> None:
    """A SuperLink connection named ``fedplug`` in ``home/config.toml``, for the ``flwr`` CLI."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
    lines.append(f"address = {json.dumps(address)}")
    if security.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(security.ca_cert))}")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def node_config_text(values: dict[str, Scalar]) -> str:
    """``--node-config`` syntax: ``key="text" key=3``."""
    return " ".join(f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in values.items())


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


def last_error(log: Path, lines: int = 3) -> str:
    """The reason a Flower server process printed last in its own ``log``: the lines after its last ``ERROR``.

    Only for a SuperLink or SuperNode that stopped or refused to start, to tell the operator why.
    """
    text = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in read_text(log).splitlines()]
    text = [line for line in text if line]
    starts = [i for i, line in enumerate(text) if line.startswith("ERROR")]
    if not starts:
        return ""
    chosen = text[starts[-1] : starts[-1] + lines + 1]
    reasons = [line.removeprefix("ERROR").strip(" :") for line in chosen if "Exit Code" not in line]
    return one_line(" ".join(line for line in reasons if not line.startswith(("INFO", "For more information"))))


def read_text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _flwr_json(group: Processes, args: list[str], timeout: float = 120) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON answer ({} if it gave none)."""
    done = subprocess.run(
        [flower_bin("flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=group.env(),
        timeout=timeout,
        check=False,
    )
    return _last_json(done.stdout) or _last_json(done.stderr)


def _last_json(text: str) -> dict[str, Any]:
    with suppress(ValueError):
        start = text.index("{")
        value = json.loads(text[start:])
        if isinstance(value, dict):
            return value
    return {}


def _flwr_failure(answer: dict[str, Any], what: str) -> str:
    reason = answer.get("error-message") or answer.get("error") or "the flwr command gave no answer"
    return one_line(f"{what}: {reason}")


def register(keys: list[Path], superlink: str, security: Security, echo: Callable[[str], None]) -> int:
    """Register SuperNode public keys on a running SuperLink with ``flwr supernode register``."""
    for key in keys:
        try:
            check_public_key(key)
        except ValueError as error:
            raise DeployError(str(error)) from error
    with supervised() as group:
        write_connection(group.home, superlink, security)
        for key in keys:
            answer = _flwr_json(group, ["supernode", "register", str(key.resolve()), CONNECTION])
            if not answer.get("success"):
                echo(f"fedplug: error: {_flwr_failure(answer, f'cannot register {key}')}")
                return 1
            echo(f"registered {key} as SuperNode {answer['node-id']}")
    return 0


@dataclass
class Submission:
    """What a submitted run reported: its id, its results folder, its rounds and how it ended."""

    run_id: int | None = None
    out: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    status: str = ""
    reason: str = ""


def submit(
    app_dir: Path,
    superlink: str,
    security: Security,
    on_round: Callable[[dict[str, Any]], None],
    on_results: Callable[[str], None],
    log: TextIO,
) -> Submission:
    """Submit the Flower App ``app_dir`` (``flwr run``) and follow its log stream (``flwr log --stream``) to the end.

    Interrupted (Ctrl-C, SIGTERM, SIGHUP), it stops the run on the SuperLink (``flwr stop``) before passing it on.
    """
    result = Submission()
    with supervised() as group:
        write_connection(group.home, superlink, security)
        answer = _flwr_json(group, ["run", str(app_dir), CONNECTION])
        log.write(json.dumps(answer) + "\n")
        if not answer.get("success") or answer.get("run-id") is None:
            result.status, result.reason = "failed", _flwr_failure(answer, "the SuperLink did not start the run")
            return result
        result.run_id = int(answer["run-id"])
        process = group.start(
            [flower_bin("flwr"), "log", str(result.run_id), CONNECTION, "--stream"], log=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                event = parse_line(line)
                if event is None:
                    continue
                kind, payload = event
                if kind == "progress":
                    result.rounds.append(payload)
                    on_round(payload)
                elif kind == "results":
                    result.out = str(payload["out"])
                    on_results(result.out)
                elif kind == "status":
                    result.status, result.reason = str(payload["status"]), str(payload.get("reason", ""))
            process.wait()
        except KeyboardInterrupt:
            subprocess.run(
                [flower_bin("flwr"), "stop", str(result.run_id), CONNECTION],
                capture_output=True,
                env=group.env(),
                timeout=60,
                check=False,
            )
            raise
    if not result.status:
        result.status, result.reason = "failed", "the run ended without a status from fedplug's ServerApp"
    return result
