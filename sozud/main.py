"""sozud's command line: turns arguments into a Config and hands over to the daemon or a sub-command.

sozud run [SETTINGS]            the daemon (systemd unit, OpenSVC app resource)
sozud --once [SETTINGS]         one sync; exit 0 when in sync after it
sozud status [--json|--check|--info|--cluster]  what the daemon last did; OpenSVC check/info; per node
sozud push --from-live          rewrite the shared state from this node's live sozu (repair)
sozud query KIND --socket P     the live configuration of a sozu
sozud plan ...                  the delta between two states, optionally applied
sozud key get|put|list ...      read and write OpenSVC keys (debugging)
sozud demo                      a local demo on SIMULATED nodes (no sozu, no agent needed)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

from sozud import __version__
from sozud.config import DEFAULT_CONFIG_PATH, SETTINGS, Config, Deprecation, load_config
from sozud.errors import ConfigError, SozudError, UnsafePlanError
from sozud.exitcodes import ExitCode
from sozud.log import configure_logging, configure_logging_from_settings

if typing.TYPE_CHECKING:
    from sozud.persist import Status


def _setting_flags() -> argparse.ArgumentParser:
    """One flag per setting (its flat name, as the SOZUD_* variable's); only flags given end up in args."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (also SOZUD_* environment variables and TOML keys, see README)")
    for name, setting in SETTINGS.items():
        default, tp = setting.default, setting.type
        shown = "" if default in (None, "") else f" (default: {default})"
        keys = " and ".join(setting.places)
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": f"{setting.help}{shown} [TOML {keys}]",
        }
        if tp is bool:
            group.add_argument(setting.flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            kwargs["choices"] = typing.get_args(tp)
        elif tp in (int, float):
            kwargs["type"] = tp
            kwargs["metavar"] = "N"
        else:
            kwargs["metavar"] = name.split("_")[-1].upper()
        group.add_argument(setting.flag, **kwargs)
    return parent


def add_configured_command(sub: Any, name: str, *, help: str, description: str | None) -> argparse.ArgumentParser:
    """A sub-command that reads the daemon's configuration: every setting flag, and ``--config``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        parents=[_setting_flags()],
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML configuration file")
    return parser


def build_parser() -> argparse.ArgumentParser:
    settings = _setting_flags()
    parser = argparse.ArgumentParser(
        prog="sozud",
        description="Keeps the sozu reverse proxies of an OpenSVC cluster in sync, one delta request at a time.",
        epilog=f"Settings come from defaults < {DEFAULT_CONFIG_PATH} (or --config) < SOZUD_* environment < flags.",
        parents=[settings],
        # The top-level parser also sees the sub-commands' options: an abbreviation matching several
        # settings there (``--cluster``: --cluster-name, --cluster-conf-file) would refuse `status --cluster`.
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sozud {__version__}")
    parser.add_argument("--config", metavar="FILE", help=f"TOML configuration file (default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--once", action="store_true", help="run one sync and exit: 0 when in sync after it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", parents=[settings], help="run the daemon (until SIGTERM; SIGHUP reloads)")
    run.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML configuration file")
    run.set_defaults(func=_cmd_run)
    for module in ("status", "push", "query", "plan", "key", "demo"):
        _register(module, sub)
    parser.set_defaults(func=None)
    return parser


def _register(module: str, sub: Any) -> None:
    import importlib

    mod = importlib.import_module(f"sozud.cli.{module}")
    mod.register(sub)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in SETTINGS}


def _load(args: argparse.Namespace, deprecations: list[Deprecation] | None = None) -> Config:
    """The configuration of a command; old flat TOML keys are logged (``config.deprecated_key``) at once,
    or added to ``deprecations`` for the caller to log once logging is set up."""
    return load_config(getattr(args, "config", None), overrides=_overrides(args), deprecations=deprecations)


def _configure_logging(config: Config) -> None:
    configure_logging_from_settings(config.log_level, config.log_format)


def _prepare(args: argparse.Namespace) -> Config:
    """The configuration of a command that syncs: loaded, logging set up, its state directory usable."""
    from sozud.config import unknown_env_names
    from sozud.log import get_logger
    from sozud.persist import check_state_dir

    deprecations: list[Deprecation] = []
    config = _load(args, deprecations)
    _configure_logging(config)
    for deprecation in deprecations:
        deprecation.log()
    for name in unknown_env_names():
        get_logger().warning("config.unknown_environment_variable", variable=name, action="ignored: no such setting")
    check_state_dir(config.sync.state_dir)
    return config


def _cmd_run(args: argparse.Namespace) -> int:
    from sozud.daemon import Daemon, run_daemon

    config = _prepare(args)
    daemon = Daemon(config, reload_config=lambda: _load(args))
    tune_gc()
    asyncio.run(run_daemon(daemon))
    return ExitCode.OK


def tune_gc() -> None:
    """Fewer cyclic garbage collections: a large routing state is millions of tracked objects, which every
    full collection walks (bench/scale.py at 10,000 clusters: a sync 15-20 % faster with collections this
    rare). sozud makes few reference cycles; memory is still freed by reference counting."""
    gc.set_threshold(50_000, 20, 20)


def _cmd_once(args: argparse.Namespace) -> int:
    from sozud.daemon import build_components

    config = _prepare(args)

    async def once() -> int:
        components = build_components(config)
        try:
            report = await components.engine.sync_once("once")
        finally:
            await components.aclose()
        summary = (
            f"{report.outcome}: {report.requests_sent} request(s) sent to sozu, "
            f"{'pushed' if report.pushed else 'nothing pushed'}, generation {report.generation}, "
            f"{len(report.conflicts)} conflict(s)"
        )
        if report.failures:
            for failure in report.failures:
                print(f"sozud: sozu refused: {failure}", file=sys.stderr)
            print(
                f"sozud: {len(report.failures)} request(s) failed in sozu; its main process may hold them while "
                f"its workers do not ({summary})",
                file=sys.stderr,
            )
            return ExitCode.ERROR
        if report.in_sync:
            print(f"sozud: in sync ({summary})")
            return ExitCode.OK
        print(f"sozud: NOT in sync after one sync: {report.drift} object(s) differ ({summary})", file=sys.stderr)
        return ExitCode.ERROR

    return asyncio.run(once())


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({time.time() - ts:.0f}s ago)"


def format_status(s: Status) -> str:
    rows: list[tuple[str, object]] = [
        ("node", s.node),
        ("sozu", f"{s.socket} (version {s.sozu_version or 'unknown'})"),
        ("opensvc", f"{s.api or 'auto'} {s.object} key {s.key}"),
        ("last sync", f"{_ago(s.last_sync_at)}: {s.last_outcome} (triggers: {s.last_reason})"),
        ("last success", _ago(s.last_success_at)),
        ("last error", s.last_error or "-"),
        ("action", s.action or "-"),
        ("drift", "unknown" if s.drift is None else f"{s.drift} object(s)"),
        ("base generation", s.base_generation),
        ("shared generation", f"{s.shared_generation} (written by {s.shared_origin or 'unknown'})"),
        ("applied here", f"generation {s.base_generation} (node {s.node})"),
        ("conflicts", s.conflicts_total),
        ("pushes", s.pushes_total),
        ("requests sent", ", ".join(f"{k}={v}" for k, v in sorted(s.requests_total.items())) or "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # One-shot commands print one clear line on failure: only errors are logged, on stderr (stdout may
    # carry data, e.g. `sozud key get`). `run` and `--once` configure logging from their settings.
    configure_logging("error")
    func: Callable[[argparse.Namespace], Any] | None = args.func
    try:
        if args.once:
            if args.command is not None:
                parser.error("--once runs one sync of the daemon; it takes no sub-command")
            return _cmd_once(args)
        if func is None:
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
        result = func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except ConfigError as e:
        print(f"sozud: configuration error: {e}", file=sys.stderr)
        return ExitCode.USAGE
    except UnsafePlanError as e:
        print(f"sozud: refused: {e}", file=sys.stderr)
        return ExitCode.UNSAFE
    except SozudError as e:
        print(f"sozud: error: {e}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
