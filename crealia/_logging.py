"""Structured logs: one JSON object a line, with the project and user a record concerns.

Sessions set :data:`log_context` when they know who they serve; Trio tasks inherit a copy of
the context of the task that started them, so every record logged on a session's behalf
carries its ``project_id``, ``user_id`` and ``session_id`` without passing them around.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
import traceback
from typing import Any, TextIO

import orjson

#: Who the current task works for: ``(project_id, user_id, session_id)`` (a tuple: one is
#: kept per connection).
log_context: contextvars.ContextVar[tuple[str | None, ...] | None] = contextvars.ContextVar(
    "crealia_log_context", default=None
)
_CONTEXT_KEYS = ("project_id", "user_id", "session_id")

#: LogRecord attributes that are not ``extra=`` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object: time, level, logger, message, the task's
    context, any ``extra=`` fields, and the exception if there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = log_context.get()
        if context:
            entry.update((k, v) for k, v in zip(_CONTEXT_KEYS, context, strict=True) if v)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return orjson.dumps(entry, default=repr).decode()


def configure(fmt: str, level: int, stream: TextIO = sys.stderr) -> None:
    """Send crealia's logs to ``stream`` as JSON lines (``fmt="json"``) or plain text."""
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def iso_time(seconds: float) -> str:
    """``2026-11-27T04:35:24.123Z`` for an epoch time in seconds."""
    millis = int(seconds * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
