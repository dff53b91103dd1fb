"""``sozud key get|put|list``: read, write and list config-map keys through the agent API (debugging).

    sozud key get igw/cfg/sozu state.json --api unix:///var/lib/opensvc/lsnr/lsnr.sock > state.json
    sozud key put igw/cfg/sozu state.json --from state.json
    sozud key list igw/cfg/sozu --api raw://node1:1214 --secret-file /root/cluster.secret

``get`` writes the raw bytes to stdout; ``put`` reads ``--from FILE`` (or stdin); ``list`` prints one
key per line. Exit status: 0 success, 1 failure, 2 usage or configuration error; failures are one
line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from sozud.errors import ConfigError, SozudError
from sozud.exitcodes import ExitCode
from sozud.log import configure_logging
from sozud.om_api import OMClient, OMSettings, client_from_url, read_secret_file

_DEFAULTS = OMSettings()  # the client's own defaults, shown in --help


def register(subparsers: Any) -> None:
    """Add the ``key`` command to an ``argparse`` sub-parsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "key",
        help="get, put or list config-map keys through the OpenSVC agent API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_key)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["get", "put", "list"])
    parser.add_argument("object", help="object path, e.g. igw/cfg/sozu")
    parser.add_argument("key", nargs="?", help="key name (get, put)")
    parser.add_argument(
        "--api",
        metavar="URL",
        help="unix://PATH, raw://HOST:1214, h2+unix://PATH, https://HOST:1215, om3+unix://PATH, "
        "om3+https://HOST:1215 (default: the local agent's sockets)",
    )
    parser.add_argument(
        "--from", dest="from_file", metavar="FILE", help="put: read the value from FILE (default stdin)"
    )
    parser.add_argument(
        "--assemble",
        action="store_true",
        help="get: KEY is the shared state's key (state.json): print it as one plain sozu state file, from "
        "its shards and manifest (sharded layout) or the plain key, for `sozu state load`",
    )
    parser.add_argument("--cluster-name", metavar="NAME", help="raw://: cluster name (default: from cluster.conf)")
    parser.add_argument("--secret-file", metavar="FILE", help="raw://, https://: file holding the cluster secret")
    parser.add_argument(
        "--cluster-conf", metavar="FILE", help=f"agent cluster config (default {_DEFAULTS.cluster_conf_file})"
    )
    parser.add_argument("--ca-file", metavar="FILE", help="https: CA of the agent's certificate")
    parser.add_argument("--cert-file", metavar="FILE", help="https: client certificate")
    parser.add_argument("--key-file", metavar="FILE", help="https: client certificate's private key")
    parser.add_argument("--username", help="om3+https: basic auth user (password from --password-file)")
    parser.add_argument("--password-file", metavar="FILE", help="om3+https: file holding the password")
    parser.add_argument("--token-file", metavar="FILE", help="om3+https: file holding a bearer token")
    parser.add_argument(
        "--run-dir", metavar="DIR", help=f"where the local agent's sockets are (default {_DEFAULTS.run_dir})"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=_DEFAULTS.request_timeout_s,
        help=f"request timeout in seconds (default {_DEFAULTS.request_timeout_s:g})",
    )


class _UsageError(Exception):
    pass


def _settings(args: argparse.Namespace) -> OMSettings:
    settings = OMSettings(
        cluster_name=args.cluster_name,
        secret_file=args.secret_file,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        username=args.username,
        password=read_secret_file(args.password_file, "--password-file"),
        token=read_secret_file(args.token_file, "--token-file"),
        request_timeout_s=args.timeout_s,
    )
    if args.cluster_conf:
        settings.cluster_conf_file = args.cluster_conf
    if args.run_dir:
        settings.run_dir = args.run_dir
    return settings


def _read_value(args: argparse.Namespace) -> bytes:
    if args.from_file is None:
        return sys.stdin.buffer.read()
    try:
        return Path(args.from_file).read_bytes()
    except OSError as exc:
        raise _UsageError(f"--from {args.from_file}: cannot read: {exc.strerror or exc}") from None


async def _assembled(client: OMClient, args: argparse.Namespace) -> bytes | None:
    """The shared state under ``args.key`` as one plain state file: from its shards and manifest
    (sharded layout) or the plain key (``sozud.layout``)."""
    from sozud.layout import OpenSVCShared
    from sozud.state.codec import MAX_STATE_BYTES

    port = OpenSVCShared(client, args.object, args.key, f"{args.key}.meta", max_state_bytes=MAX_STATE_BYTES)
    state, _ = await port.read()
    return None if state is None else state.assembled


async def run_key(args: argparse.Namespace) -> int:
    """Run ``sozud key``; returns the exit status.

    Configure logging to stderr before calling it (``sozud.log.configure_logging``): structlog's
    default prints to stdout, which carries the value of ``get``.
    """
    try:
        if args.action in ("get", "put") and not args.key:
            raise _UsageError(f"key {args.action}: a KEY is required")
        if args.action == "list" and args.key:
            raise _UsageError("key list: takes no KEY")
        if args.assemble and args.action != "get":
            raise _UsageError(f"key {args.action}: --assemble is only for get")
        if args.action != "put" and args.from_file:
            raise _UsageError(f"key {args.action}: --from is only for put")
        settings = _settings(args)
        value = _read_value(args) if args.action == "put" else b""
    except _UsageError as exc:
        print(f"sozud: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        client = client_from_url(args.api, settings)
        try:
            if args.action == "get":
                got = await _assembled(client, args) if args.assemble else await client.get_key(args.object, args.key)
                if got is None:
                    print(f"sozud: {args.object} has no key {args.key}", file=sys.stderr)
                    return ExitCode.ERROR
                sys.stdout.buffer.write(got)
                sys.stdout.buffer.flush()
            elif args.action == "put":
                await client.put_key(args.object, args.key, value)
            else:
                for name in await client.list_keys(args.object):
                    print(name)
        finally:
            await client.aclose()
    except ConfigError as exc:  # a bad --api URL, unreadable secret or TLS file: fix the command
        print(f"sozud: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except SozudError as exc:
        print(f"sozud: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """``python -m sozud.cli.key ...`` (same arguments as ``sozud key``)."""
    parser = argparse.ArgumentParser(
        prog="sozud key", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging("warning")  # to stderr: stdout carries the value
    return asyncio.run(run_key(args))


if __name__ == "__main__":
    sys.exit(main())
