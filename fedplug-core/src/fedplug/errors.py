"""fedplug's errors: what a user can get wrong, and how a run can end badly.

Every message is one line that says what to do instead. ``FedplugError.exit_code`` is the
``fedplug`` command's exit code for it: 2 for a mistake in what it was asked to do
(nothing was started or written), 1 for a run that started and could not finish.
"""

from __future__ import annotations

MESSAGE_LIMIT = 300
"""Characters of a message shown to a user at most; longer ones (a dump of raw bytes, a list of every
key) are cut, and their makers cut the long part first so that the advice at the end survives."""


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as one printable line of at most ``limit`` characters.

    Line breaks and runs of white space become one space, characters that a terminal would not
    print (control characters, the bytes of a binary file) become escapes such as ``\\x00``.
    """
    flat = " ".join(str(text).split())
    printable = "".join(char if char.isprintable() else ascii(char)[1:-1] for char in flat)
    return printable if len(printable) <= limit else printable[: limit - 3] + "..."


def shown(value: object, limit: int = 100) -> str:
    """``value`` for a message, its middle elided when longer than ``limit``: the advice after it stays in view."""
    text = str(value)
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]}...{text[-half:]}"


class FedplugError(Exception):
    """Base of fedplug's own errors; the message is one line that says what to do."""

    exit_code = 2


class BackendUnavailable(RuntimeError):
    """The backend's framework is missing or cannot run on this machine."""


class ModelError(ValueError):
    """A model cannot be built for this data spec or run config."""


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
