"""The exit codes of every sozud command, in one place.

Their values are part of the command line's contract (scripts, systemd and OpenSVC's ``retcodes`` read
them): never renumber one.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every command but ``status --check``."""

    OK = 0
    ERROR = 1  # the one line on stderr names the socket, key or request and why
    USAGE = 2  # usage or configuration error
    UNSAFE = 3  # refused by the removal safety valve (re-run with --force if intended)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class CheckCode(IntEnum):
    """``sozud status --check``, as an OpenSVC app resource maps it (``retcodes = 0:up 1:down 2:warn``)."""

    UP = 0  # in sync
    DOWN = 1  # sozud not running, or never ran here
    WARN = 2  # starting, drifting, failing, or in sync with requests sozu refused
