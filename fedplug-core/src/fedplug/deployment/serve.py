"""``fedplug superlink`` and ``fedplug supernode``: Flower's SuperLink and a SuperNode in the foreground.

Each runs until Ctrl-C (or SIGTERM, SIGHUP), which stops it and every process it started
(:mod:`fedplug.deployment.processes`). A SuperNode's node config names its own data file
(``data=...``): the data never leaves its machine.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from fedplug import flower_adapter
from fedplug.backend import Scalar
from fedplug.deployment.flower_cli import (
    Security,
    last_error,
    read_text,
    superlink_command,
    superlink_files,
    supernode_command,
)
from fedplug.deployment.network import port_open, wait_for
from fedplug.deployment.processes import supervised

SUPEREXEC_POLL = 0.1
"""Seconds between a SuperExec's looks for new tasks (a SuperNode's ClientApps, a SuperLink's ServerApps).

Flower's default is 1 s: each message to a SuperNode would wait 0.5 s on average before its ClientApp
starts. Each look is one request on loopback (the SuperNode's or SuperLink's runtime API).
"""
FORCE_QUIT_AFTER = 2.0
"""Seconds after Ctrl-C at which Flower's SuperLink gets a second one.

It is a uvicorn server: on the first SIGINT (or SIGTERM) it stops taking connections and waits,
without limit, for the open ones to close; a run's log stream (``fedplug run``, ``flwr log
--stream``) never does. A second SIGINT is its own "force quit".
"""


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
    with supervised() as group:
        process = group.start(
            superlink_command(host, port, files, node_auth and not insecure, database),  # type: ignore[arg-type]
            log=log,
            env=flower_adapter.superexec_poll_environment(SUPEREXEC_POLL),
            force_quit_after=FORCE_QUIT_AFTER,
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
        if _interrupted(process, echo, "fedplug: stopping the SuperLink ..."):
            return 130
        reason = last_error(log) or f"exit code {process.returncode}"
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
    max_wait: float = 300.0,
) -> int:
    """``fedplug supernode``: Flower's SuperNode with this node's config until Ctrl-C or refusal.

    Flower's SuperNode retries an unreachable SuperLink for ever: after ``max_wait`` seconds
    without joining, it is stopped and the reason said in one line.
    """
    with supervised() as group:
        process = group.start(
            supernode_command(superlink, security, key, node_config, runtime_port),
            log=log,
            env=flower_adapter.superexec_poll_environment(SUPEREXEC_POLL),
        )
        echo(f"fedplug: connecting to the SuperLink {superlink} (Flower's log: {log}) ...")
        connected = wait_for(lambda: "SuperNode ID:" in read_text(log), timeout=max_wait, process=process)
        if not connected and process.poll() is None:
            warn(
                f"fedplug: error: no SuperLink answered at {superlink} within {max_wait:g} s: is it running, and "
                f"is this its address and port (fedplug superlink prints them)? --max-wait waits longer (log: {log})"
            )
            return 1
        if connected:
            node_id = read_text(log).split("SuperNode ID:", 1)[1].split()[0]
            echo(f"fedplug: connected to {superlink} as SuperNode {node_id}; waiting for runs (Ctrl-C leaves)")
        if _interrupted(process, echo, "fedplug: leaving the federation ..."):
            return 130
        reason = last_error(log) or f"exit code {process.returncode}"
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


def _interrupted(process: subprocess.Popen[bytes], echo: Callable[[str], None], leaving: str) -> bool:
    """Wait for the Flower process to end; True (after saying ``leaving``) if Ctrl-C or a signal ended the wait."""
    try:
        process.wait()
    except KeyboardInterrupt:
        echo(leaving)
        return True
    return False
