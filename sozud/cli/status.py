"""``sozud status``: what the daemon last did, for a person, for the OpenSVC ``app`` resource, and cluster-wide.

    sozud status [--json]        this node's status file (STATE_DIR/status.json), as a table or JSON
    sozud status --check         one line, and the exit code an OpenSVC app resource's ``check`` maps to a
                                 status (``retcodes = 0:up 1:down 2:warn``): 0 in sync, 1 sozud not running
                                 or never synced, 2 drifting or failing
    sozud status --info          ``key: value`` lines for the app resource's ``info`` (resinfo)
    sozud status --cluster       one line per node, from what the local agent reports of each node's app
                                 resource (its status and its check's last line, with ``status_log = true``);
                                 nothing is written to the state-holding object

The check reads only the local status file: it costs nothing to the agent or to sozu.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import msgspec

from sozud.exitcodes import CheckCode, ExitCode

if TYPE_CHECKING:
    from sozud.persist import Status


def register(sub: Any) -> None:
    from sozud.main import add_configured_command

    st = add_configured_command(
        sub,
        "status",
        help="show what the daemon last did (STATE_DIR/status.json); --check/--info for OpenSVC, --cluster",
        description=__doc__,
    )
    mode = st.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_true", help="print the status file as JSON")
    mode.add_argument("--check", action="store_true", help="one line; exit 0 in sync, 1 down, 2 drifting/failing")
    mode.add_argument("--info", action="store_true", help="key: value lines (OpenSVC app resource info)")
    mode.add_argument("--cluster", action="store_true", help="one line per node, from the agent's cluster data")
    st.add_argument("--service", default="igw/svc/sozu", help="the OpenSVC service running sozud (--cluster)")
    st.add_argument("--rid", default="app#sozud", help="sozud's app resource id in that service (--cluster)")
    st.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from sozud.main import _load, format_status
    from sozud.persist import StatusFile

    config = _load(args)
    if args.cluster:
        return asyncio.run(_cluster(config, args.service, args.rid))
    status = StatusFile(config.sync.state_dir).read()
    if args.check or args.info:
        code, state, line = health(status, config.sync.state_dir)
        if args.check:
            print(line)
            return code
        for k, v in info_lines(status, state, line):
            print(f"{k}: {v}")
        return ExitCode.OK
    if status is None:
        print(f"sozud: no status yet in {config.sync.state_dir} (the daemon has not run a sync there)", file=sys.stderr)
        return ExitCode.ERROR
    if args.json:
        print(json.dumps(msgspec.to_builtins(status), indent=2, sort_keys=True))
        return ExitCode.OK
    print(format_status(status))
    return ExitCode.OK


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health(status: Status | None, state_dir: str) -> tuple[CheckCode, str, str]:
    """(exit code, state word, one line) of this node's sozud."""
    if status is None:
        return CheckCode.DOWN, "down", f"down: no status in {state_dir} (sozud has not run here)"
    if not _alive(status.pid):
        return CheckCode.DOWN, "down", f"down: sozud (pid {status.pid}) is not running"
    if status.last_sync_at is None:
        return CheckCode.WARN, "starting", "starting: no sync yet"
    applied, shared, origin = status.base_generation, status.shared_generation, status.shared_origin or "?"
    if status.last_outcome == "failed" and status.last_error_type == "ConvergenceError":
        return (
            CheckCode.WARN,
            "drifting",
            f"drifting: sozu cannot take the shared state (generation {applied} applied): {status.last_error}",
        )
    if status.last_outcome == "failed":
        action = f"; {status.action}" if status.action else ""
        n = status.consecutive_failures
        return CheckCode.WARN, "failing", f"failing ({n} in a row): {status.last_error}{action}"
    if status.drift is not None and status.drift > 0:
        drift = status.drift
        return (
            CheckCode.WARN,
            "drifting",
            f"drifting: {drift} object(s) differ from shared generation {shared} ({origin})",
        )
    if status.last_error:
        return CheckCode.WARN, "degraded", f"in sync with requests sozu refused: {status.last_error}"
    return CheckCode.UP, "in_sync", f"in sync: generation {applied} applied, shared generation {shared} ({origin})"


def info_lines(status: Status | None, state: str, line: str) -> list[tuple[str, object]]:
    from sozud.persist import Status

    s = status or Status()
    last = s.last_sync_at
    return [
        ("sozud_state", state),
        ("sozud_summary", line),
        ("generation_applied", s.base_generation),
        ("shared_generation", s.shared_generation),
        ("shared_origin", s.shared_origin),
        ("drift_objects", s.drift),
        ("last_sync", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last is not None else None),
        ("consecutive_failures", s.consecutive_failures),
        ("sozu_version", s.sozu_version),
    ]


async def _cluster(config: Any, service: str, rid: str) -> int:
    from sozud.daemon import om_settings
    from sozud.om_api import client_from_url

    client = client_from_url(config.opensvc.api, om_settings(config))
    try:
        rows = await client.resource_status(service, rid)
    finally:
        await client.aclose()
    if not rows:
        print(f"sozud: the agent reports no instance of {service} with a resource {rid}", file=sys.stderr)
        return ExitCode.ERROR
    width = max(len(node) for node in rows)
    for node, (state, message) in sorted(rows.items()):
        print(f"{node.ljust(width)}  {state:<5}  {message}")
    return ExitCode.OK
