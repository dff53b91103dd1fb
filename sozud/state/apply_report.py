"""What ``apply_plan`` reports: each request sent alone (:class:`StepResult`), each ``load_state`` chunk
(:class:`BatchResult`), and the whole call (:class:`ApplyReport`). Import these names from
:mod:`sozud.state.apply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sozud import serde
from sozud.state.live import LiveRead
from sozud.state.model import ConfigState, ObjKey
from sozud.state.plan import Plan, PlanStep

__all__ = ["ApplyReport", "BatchResult", "StepResult"]


@dataclass
class StepResult:
    """One request sent one at a time, and what sozu answered."""

    round: int
    kind: str  # request type, e.g. add_backend
    summary: str
    ok: bool
    message: str  # sozu's message (FAILURE text, or the OK text)
    main_accepted: bool  # the main state took it (OK, or FAILURE after PROCESSING: workers refused)
    key: ObjKey | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "request": self.kind,
            "summary": self.summary,
            "ok": self.ok,
            "main_accepted": self.main_accepted,
            "message": self.message,
        }


@dataclass
class BatchResult:
    """One ``load_state`` of a chunk of the plan."""

    index: int
    first_step: int  # index in the round's plan
    steps: int
    bytes: int
    ok: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk": self.index,
            "first_step": self.first_step,
            "steps": self.steps,
            "bytes": self.bytes,
            "ok": self.ok,
            "message": self.message,
        }


@dataclass
class ApplyReport:
    """What ``apply_plan`` did: applied steps, failures, batches, and the final re-read plan."""

    plan_digest: str  # of the first plan
    first_plan_steps: int
    live_after: ConfigState  # the last live read
    steps: list[StepResult] = field(default_factory=list)
    batches: list[BatchResult] = field(default_factory=list)
    rounds: int = 0
    converged: bool = False
    remaining: Plan | None = None  # the plan computed from the last re-read (empty when converged)
    requests_by_type: dict[str, int] = field(default_factory=dict)
    live_reads: int = 0
    # rounds whose every request sozu accepted, verified by the answers instead of a re-read (exact reads)
    predicted_reads: int = 0
    last_read: LiveRead | None = None  # the final re-read or prediction (what it could not see: ``hides``)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def applied(self) -> list[StepResult]:
        return [s for s in self.steps if s.ok]

    @property
    def failures(self) -> list[StepResult]:
        return [s for s in self.steps if not s.ok]

    @property
    def requests_sent(self) -> int:
        return sum(self.requests_by_type.values())

    def first_failure_text(self) -> str | None:
        for s in self.steps:
            if not s.ok:
                return f"{s.kind} {s.summary}: {s.message}"
        for b in self.batches:
            if not b.ok:
                return f"load_state of chunk {b.index} ({b.steps} steps): {b.message}"
        return None

    def to_json(self) -> dict[str, Any]:
        remaining = self.remaining
        return {
            "converged": self.converged,
            "rounds": self.rounds,
            "plan_digest": self.plan_digest,
            "first_plan_steps": self.first_plan_steps,
            "applied": [s.to_json() for s in self.steps if s.ok],
            "failed": [s.to_json() for s in self.steps if not s.ok],
            "batches": [b.to_json() for b in self.batches],
            "remaining": [] if remaining is None else [_step_json(s) for s in remaining.steps],
            "requests_by_type": dict(sorted(self.requests_by_type.items())),
            "live_reads": self.live_reads,
            "notes": list(self.notes),
            "duration_ms": round(self.duration_s * 1000, 2),
        }


def _step_json(step: PlanStep) -> dict[str, Any]:
    return {"request": serde.request_kind(step.request), "action": step.action, "summary": step.summary}
