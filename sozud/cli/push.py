"""``sozud push --from-live``: rewrite the shared state from this node's live sozu.

The operator's repair when the shared key blocks the cluster: it does not parse (a cut or hand-mangled
value), or it was written by another sozu family. sozud never overwrites such a key by itself; this command
does, with the daemon's configuration (same settings and flags as ``--once``). The removal valve applies
against the current shared state when it parses: ``--force`` to remove more than ``max_removal_ratio`` of
its objects. Other nodes then merge what they hold that this state lacks (additions only: the push does
not descend from what they knew) and push the union back.

Exit codes: 0 pushed, 1 error, 2 usage or configuration, 3 refused by the removal valve.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


def register(sub: Any) -> None:
    from sozud.main import add_configured_command

    p = add_configured_command(
        sub,
        "push",
        help="rewrite the shared state from this node's live sozu (repair of an unusable shared key)",
        description=__doc__,
    )
    p.add_argument("--from-live", action="store_true", required=True, help="the state to push: this node's live sozu")
    p.set_defaults(func=_cmd_push)


def _cmd_push(args: argparse.Namespace) -> int:
    from sozud.daemon import build_components
    from sozud.exitcodes import ExitCode
    from sozud.main import _prepare

    config = _prepare(args)

    async def push() -> int:
        components = build_components(config)
        try:
            report, replaced = await components.engine.push_live()
        finally:
            await components.aclose()
        print(
            f"sozud: pushed this node's live state ({report.local_changes} objects) to {config.opensvc.object} key "
            f"{config.opensvc.key} as generation {report.generation}, replacing {replaced}"
        )
        return ExitCode.OK

    return asyncio.run(push())
