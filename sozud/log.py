"""structlog set-up: one event per line, JSON when not on a terminal, secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from sozud.redact import redact_obj


def _redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    redacted = redact_obj(dict(event_dict))
    assert isinstance(redacted, dict)
    return redacted


class _StderrLogger:
    """Writes each rendered event to the *current* ``sys.stderr`` (looked up per event, so a replaced
    stream — a test harness, a re-opened terminal — is followed) and never raises: a log line that
    cannot be written must not stop a sync."""

    def msg(self, message: str) -> None:
        try:
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    debug = info = warning = warn = error = critical = exception = fatal = failure = msg


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog for sozud. ``json=None`` picks JSON unless stderr is a terminal."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )


LOG_FORMATS: dict[str, bool | None] = {"auto": None, "json": True, "console": False}


def configure_logging_from_settings(log_level: str, log_format: str) -> None:
    """Configure structlog from the ``log_level`` and ``log_format`` settings (start-up and reload)."""
    configure_logging(log_level, json=LOG_FORMATS[log_format])


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` context (e.g. node, socket).

    A lazy proxy: the configuration (renderer, redaction, level) is looked up when an event is logged,
    so a module-level logger created before :func:`configure_logging` still follows it.
    """
    return structlog.get_logger("sozud", **bound)
