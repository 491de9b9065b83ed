"""Addresses and ports of a federation: parsing ``HOST:PORT``, probing, waiting."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

from fedplug.errors import DeployError

DEFAULT_PORT = 9092
"""The SuperLink's one port (Fleet, Control and Runtime APIs) in fedplug's commands; Flower's own default is 8000."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[::1]:9092`` too); DeployError otherwise."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"'{address}' is not HOST:PORT (e.g. coordinator.example.org:{DEFAULT_PORT})")
    return host.strip("[]"), int(port)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::", "") else host, port), timeout):
            return True
    except OSError:
        return False


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
