"""fedplug's errors: what a user can get wrong, and how a run can end badly.

Every message is one line that says what to do instead. ``FedplugError.exit_code`` is the
``fedplug`` command's exit code for it: 2 for a mistake in what it was asked to do
(nothing was started or written), 1 for a run that started and could not finish.
"""

from __future__ import annotations

MAX_MESSAGE = 600
"""Characters of a message shown to a user; longer ones (a dump of raw bytes, a list of
every key) are cut with an ellipsis."""


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line, printable, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


class FedplugError(Exception):
    """Base of fedplug's own errors; the message is one line that says what to do."""

    exit_code = 2


class ConfigError(FedplugError, ValueError):
    """A run-config key or value is wrong; the message says what to write instead."""


class DeployError(FedplugError, ValueError):
    """Bad input for a deployment command (an address, a certificate, a key); the message says what to do."""


class RunError(FedplugError, RuntimeError):
    """A run that started could not finish; the message says why. Its results folder keeps what it finished."""

    exit_code = 1

    def __init__(self, message: str, out: object = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.out = out
        self.exit_code = exit_code


class UnavailableError(FedplugError, RuntimeError):
    """This machine lacks what a run needs (a framework, a working install); the message says what to install."""

    exit_code = 1
