"""The ServerApp's structured status lines: how a run on a SuperLink reports to whoever submitted it.

Flower forwards a ServerApp's standard output to the SuperLink's log stream (``flwr log
--stream``). fedplug's deployment ServerApp (``fedplug.deploy_app``) prints one line per
event, ``fedplug-<kind> {json}``: ``results`` (where the results folder is), ``progress``
(a finished round's record) and ``status`` (how the run ended and why). The submitting
machine reads only these lines; it never interprets Flower's own log text.
"""

from __future__ import annotations

import json
from typing import Any

KINDS = ("results", "progress", "status")
_PREFIX = "fedplug-"


def format_line(kind: str, payload: dict[str, Any]) -> str:
    """The line that reports ``payload`` as an event of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown status line kind {kind!r}")
    return f"{_PREFIX}{kind} {json.dumps(payload, allow_nan=False, default=str)}"


def parse_line(text: str) -> tuple[str, dict[str, Any]] | None:
    """``(kind, payload)`` of a status line anywhere in ``text`` (a log line may carry a prefix), or None."""
    for kind in KINDS:
        marker = f"{_PREFIX}{kind} "
        if marker in text:
            try:
                payload = json.loads(text.split(marker, 1)[1])
            except ValueError:
                return None
            return (kind, payload) if isinstance(payload, dict) else None
    return None
