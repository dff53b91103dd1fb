"""``sozud plan``: show (and optionally apply) the requests that turn one sozu state into another.

Two forms::

    sozud plan --desired FILE [--socket PATH] [--json] [--apply] [--force] [--max-removal-ratio R]
               [--shared-dir DIR] [--shared-dir-sozu-path DIR] [--sozu-version V]
    sozud plan --from A --to B [--json] [--force] [--max-removal-ratio R] [--sozu-version V]

The first reads the live state of the sozu behind ``--socket`` (one ``save_state`` with
``--shared-dir``, else queries) and plans from it to ``FILE``; ``--apply`` applies the plan and
reports what was applied, what failed (with sozu's message) and what remains. The second is offline:
the plan from state file ``A`` to state file ``B``.

Output is a table, or JSON with ``--json``; private keys never appear in it. Exit status: 0 on
success (including an empty plan), 1 on an error (one line naming the file or socket and what
failed), 3 when the safety valve refused the plan (too many removals: review it, then ``--force``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sozud.errors import SozudError, UnsafePlanError
from sozud.exitcodes import ExitCode
from sozud.redact import redact_text
from sozud.state.model import ConfigState
from sozud.versions import SozuVersion

__all__ = ["register", "run_plan"]


DEFAULT_SOCKET = "/run/sozu/sozu.sock"


def register(subparsers: Any) -> None:
    """Add the ``plan`` sub-command to an ``argparse`` sub-parsers object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "plan",
        help="show (or apply) the requests that turn the live sozu, or a state file, into a desired state",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--desired", metavar="FILE", help="desired sozu state file (plan from the live sozu)")
    src.add_argument("--from", dest="from_file", metavar="A", help="state file to plan from (offline, with --to)")
    p.add_argument("--to", dest="to_file", metavar="B", help="state file to plan to (offline, with --from)")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"sozu command socket (default {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--apply", action="store_true", help="apply the plan to the live sozu")
    p.add_argument("--force", action="store_true", help="accept a plan that the removal safety valve refuses")
    p.add_argument(
        "--max-removal-ratio",
        type=float,
        default=0.5,
        metavar="R",
        help="refuse a plan removing more than this share of the live objects (default 0.5)",
    )
    p.add_argument(
        "--shared-dir",
        metavar="DIR",
        help="directory shared with sozu's main process (fast exact live reads, batch apply)",
    )
    p.add_argument(
        "--shared-dir-sozu-path",
        metavar="DIR",
        help="the same directory as sozu sees it, when it differs (container mount)",
    )
    p.add_argument("--sozu-version", metavar="V", help="sozu version (default: detected, or from the files)")
    p.add_argument("--max-rounds", type=int, default=3, metavar="N", help="apply rounds before giving up (default 3)")
    p.add_argument(
        "--request-timeout-s", type=float, default=10.0, metavar="S", help="per-request timeout (default 10)"
    )
    p.set_defaults(func=run_plan)


async def run_plan(args: argparse.Namespace) -> int:
    """Run ``sozud plan``; returns the exit status (messages go to stdout / stderr)."""
    try:
        version = SozuVersion.parse(args.sozu_version) if args.sozu_version else None
        if not 0.0 <= args.max_removal_ratio <= 1.0:
            return _fail(f"--max-removal-ratio must be between 0 and 1, got {args.max_removal_ratio}")
        if args.from_file is not None:
            if args.to_file is None:
                return _fail("--from needs --to (the state file to plan to)")
            if args.apply:
                return _fail("--apply needs --desired (it applies to the live sozu behind --socket)")
            return _offline(args, version)
        if args.to_file is not None:
            return _fail("--to goes with --from (use --desired to plan from the live sozu)")
        return await _online(args, version)
    except UnsafePlanError as e:
        print(f"sozud plan: {redact_text(str(e))}", file=sys.stderr)
        return ExitCode.UNSAFE
    except SozudError as e:
        return _fail(str(e))


def _fail(message: str) -> int:
    print(f"sozud plan: {redact_text(message)}", file=sys.stderr)
    return ExitCode.ERROR


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _FileError(f"cannot read {what} {path}: {e.strerror or e}") from None


class _FileError(SozudError):
    """A file given on the command line cannot be read (reported as one line, exit 1)."""


def _parse(path: str, version: SozuVersion | None, what: str) -> ConfigState:
    from sozud.state.codec import parse_state_file

    return parse_state_file(_read_file(path, what), version, source=path)


def _offline(args: argparse.Namespace, version: SozuVersion | None) -> int:
    from sozud.state.plan import plan

    a = _parse(args.from_file, version, "state file")
    b = _parse(args.to_file, version or a.version, "state file")
    p = plan(a, b, max_removal_ratio=args.max_removal_ratio, force=args.force)
    _print_plan(p, args, notes=[], header=f"plan from {args.from_file} to {args.to_file}")
    return ExitCode.OK


async def _online(args: argparse.Namespace, version: SozuVersion | None) -> int:
    from sozud.socket_proto import SozuChannel
    from sozud.state.apply import apply_plan
    from sozud.state.live import read_live_report
    from sozud.state.plan import plan

    data = _read_file(args.desired, "desired state file")
    ch = SozuChannel(args.socket, version=version, request_timeout_s=args.request_timeout_s, max_connect_attempts=1)
    try:
        await ch.connect()
        from sozud.state.codec import parse_state_file

        desired = parse_state_file(data, ch.version, source=args.desired)
        shared_dir_sozu_path = args.shared_dir_sozu_path or args.shared_dir
        read = await read_live_report(ch, shared_dir=args.shared_dir, shared_dir_sozu_path=shared_dir_sozu_path)
        p = plan(read.state, desired, max_removal_ratio=args.max_removal_ratio, force=args.force)
        header = f"plan from the live sozu at {args.socket} to {args.desired}"
        if not args.apply:
            _print_plan(p, args, notes=read.notes, header=header)
            return ExitCode.OK
        report = await apply_plan(
            ch,
            desired,
            max_rounds=args.max_rounds,
            shared_dir=args.shared_dir,
            shared_dir_sozu_path=shared_dir_sozu_path,
            max_removal_ratio=args.max_removal_ratio,
            force=args.force,
            raise_on_failure=False,
        )
    finally:
        await ch.aclose()
    if args.json:
        _print_json({"plan": _plan_json(p), "notes": read.notes, "apply": report.to_json()})
    else:
        _print_plan(p, args, notes=read.notes, header=header)
        print()
        print(redact_text(_report_text(report)))
    if not report.converged:
        print(
            f"sozud plan: sozu at {args.socket} still differs from {args.desired} after {report.rounds} round(s); "
            f"first failure: {redact_text(report.first_failure_text() or 'none')}",
            file=sys.stderr,
        )
        return ExitCode.ERROR
    return ExitCode.OK


def _plan_json(p: Any) -> Any:
    value = p.to_json()
    if isinstance(value, str | bytes):
        value = json.loads(value)
    return value


def _print_json(value: Any) -> None:
    # The plan already leaves private keys out; any PEM key that slipped into a message is cut here.
    print(redact_text(json.dumps(value, indent=2)))


def _print_plan(p: Any, args: argparse.Namespace, *, notes: list[str], header: str) -> None:
    if args.json:
        _print_json({"plan": _plan_json(p), "notes": notes})
        return
    print(f"# {header}")
    for note in notes:
        print(f"# note: {note}")
    if p.is_empty:
        print("nothing to do: the states are equal")
        return
    print(redact_text(str(p.to_table())))


def _report_text(report: Any) -> str:
    lines = [
        f"apply: {'converged' if report.converged else 'NOT converged'} in {report.rounds} round(s), "
        f"{len(report.applied)} request(s) applied, {len(report.failures)} failed, "
        f"{report.requests_sent} request(s) sent in all ({report.live_reads} live read(s))"
    ]
    for b in report.batches:
        lines.append(
            f"  batch {b.index}: {b.steps} step(s), {b.bytes} bytes: {'OK' if b.ok else 'FAILURE'} {b.message}"
        )
    for s in report.failures:
        accepted = " (kept by sozu's main state; its workers refused it)" if s.main_accepted else ""
        lines.append(f"  FAILED round {s.round}: {s.kind} {s.summary}: {s.message}{accepted}")
    remaining = report.remaining
    if remaining is not None and not remaining.is_empty:
        lines.append(f"  remaining ({len(remaining.steps)} step(s)):")
        for step in remaining.steps:
            lines.append(f"    {step.summary}")
    for note in report.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
