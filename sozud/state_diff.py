"""``ConfigState``, the state-file codec, the delta planner and the three-way merge (one import).

The code lives in ``sozud/state/``: ``model`` (the state and sozu's main-state rules), ``codec``
(state files), ``plan`` (ordered delta requests, the safety valve) and ``merge`` (three-way merge).
This module re-exports their public names, as the project layout asks for a ``state_diff`` module.
"""

from __future__ import annotations

from sozud.state.codec import (
    detect_family,
    detect_version,
    file_digest,
    parse_state_file,
    record_count,
    state_requests,
    write_state_file,
)
from sozud.state.merge import Conflict, MergeResult, merge
from sozud.state.model import (
    KINDS,
    ConfigState,
    Kind,
    ObjKey,
    add_request,
    apply_request,
    certificate_fingerprint,
    describe,
    key_of,
    listener_key,
    route_key,
    value_digest,
)
from sozud.state.plan import ACTIONS, Plan, PlanStep, StateDiff, diff, plan

__all__ = [
    "ACTIONS",
    "KINDS",
    "ConfigState",
    "Conflict",
    "Kind",
    "MergeResult",
    "ObjKey",
    "Plan",
    "PlanStep",
    "StateDiff",
    "add_request",
    "apply_request",
    "certificate_fingerprint",
    "describe",
    "detect_family",
    "detect_version",
    "diff",
    "file_digest",
    "key_of",
    "listener_key",
    "merge",
    "parse_state_file",
    "plan",
    "record_count",
    "route_key",
    "state_requests",
    "value_digest",
    "write_state_file",
]
