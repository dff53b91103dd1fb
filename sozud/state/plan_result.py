"""What a plan is: :class:`PlanStep` (one request, printable without secrets) and :class:`Plan` (the
ordered steps, their digest and counts, the table and the redacted JSON that ``sozud plan`` prints).

Built by :func:`sozud.state.plan.plan`; import these names from there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from sozud import serde
from sozud.proto import command_pb2 as pb
from sozud.redact import REDACTED, redact_text
from sozud.state.model import ObjKey
from sozud.versions import SozuVersion

__all__ = ["ACTIONS", "Plan", "PlanStep"]

ACTIONS = ("add", "remove", "replace", "update", "activate", "deactivate")


@dataclass(frozen=True)
class PlanStep:
    """One request of a plan. ``summary`` is printable (no secrets)."""

    request: pb.Request
    action: str  # one of ACTIONS
    key: ObjKey
    summary: str

    @property
    def request_type(self) -> str:
        return self.request.WhichOneof("request_type") or "empty"


@dataclass
class Plan:
    """Ordered requests from ``live`` to ``desired``, and what they do to the set of objects."""

    version: SozuVersion
    steps: list[PlanStep] = field(default_factory=list)
    removals: list[ObjKey] = field(default_factory=list)  # live objects that desired lacks
    additions: list[ObjKey] = field(default_factory=list)  # desired objects that live lacks
    changes: list[ObjKey] = field(default_factory=list)  # in both, with different values

    @property
    def is_empty(self) -> bool:
        return not self.steps

    def __len__(self) -> int:
        return len(self.steps)

    def digest(self) -> str:
        """Stable sha-256 hex of the ordered requests (for logs; 16 hex digits are plenty there)."""
        h = hashlib.sha256()
        for step in self.steps:
            data = step.request.SerializeToString(deterministic=True)
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def to_table(self) -> str:
        """A human table of the steps (no private keys)."""
        if not self.steps:
            return "(empty plan: live already matches desired)"
        lines = [f"{'#':>4}  {'action':<10}  {'request':<24}  object"]
        for i, step in enumerate(self.steps):
            lines.append(f"{i:>4}  {step.action:<10}  {step.request_type:<24}  {step.summary}")
        lines.append(
            f"{len(self.steps)} requests: +{len(self.additions)} ~{len(self.changes)} -{len(self.removals)} objects"
        )
        return "\n".join(lines)

    def to_json(self) -> list[dict[str, Any]]:
        """The steps as JSON-ready dicts, requests in sozu's JSON shape with private keys redacted."""
        return [
            {
                "n": i,
                "action": step.action,
                "request_type": step.request_type,
                "key": list(step.key),
                "summary": step.summary,
                "request": _redacted_json(step.request, self.version),
            }
            for i, step in enumerate(self.steps)
        ]


def _redacted_json(req: pb.Request, version: SozuVersion) -> Any:
    copy = pb.Request()
    copy.CopyFrom(req)
    _redact_keys(copy)
    return _redact_strings(serde.to_json(copy, version))


def _redact_keys(msg: Message) -> None:
    name = msg.DESCRIPTOR.name
    if name in ("CertificateAndKey", "HttpsListenerConfig") and msg.HasField("key"):
        setattr(msg, "key", REDACTED)  # noqa: B010
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        if fd.is_repeated:
            for item in value:
                _redact_keys(item)
        else:
            _redact_keys(value)


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_strings(v) for v in value]
    return value
