"""Applying a desired ``ConfigState`` to a live sozu: read, plan, send in order, re-read, converge.

One round: send the plan's requests in order, one at a time (the channel serialises them), and stop
at the first ``FAILURE``; then read the live state again and plan again. ``apply_plan`` converges
when the re-read plan is empty, else, after ``max_rounds`` rounds without progress, it raises
``ConvergenceError`` naming the first failing request and sozu's reason (or returns the report,
``raise_on_failure=False``). A round that ends on a request the main state kept (below) made progress
(that request will not be planned again) and does not count; a round that ends on a refusal, a
timeout, or with every request accepted and a diff left behind does. So a plan with several requests
on listener-less addresses (the fixtures have three) still converges with the default of 3, and a
request sozu refuses is tried ``max_rounds`` times. The total number of rounds is capped at
``max_rounds`` plus the first plan's length.

A ``FAILURE`` whose ``PROCESSING`` frames show that the main state accepted the request (the workers
refused it: a frontend or certificate on an address without a listener) leaves the object in the main
state (docs/sozu-command-protocol.md §3.3): the re-read sees it, the next plan does not resend it, and
the report keeps the failure with sozu's message.

**Batch mode** (a shared directory and a plan of at least ``batch_threshold`` steps): the plan's
requests, in order, are written as state files (``WorkerRequest`` JSON records, ``\\n\\0``) and sent as
one ``load_state`` per chunk. ``load_state`` skips silently the records the main state refuses and
reports worker failures only as counts, so the live state is read and planned again afterwards and
what remains is sent one request at a time, where every failure is attributed to its request.
Worker-side failures inside a chunk stay attributed to the chunk (its ``load_state`` message).

Chunk size. ``load_state`` queues, for every worker, one main→worker message per record applied; the
queue is capped by sozu's ``max_command_buffer_size`` (default 2 000 000 bytes) and an overflow makes
sozu kill its workers and never answer (§11.10). Chunks are cut on the size of *our JSON records*,
which is larger than what sozu queues: 1.x/2.x send protobuf to workers (the fixtures' 10 000-object
file is 3.2 MB of JSON and fits the 2 MB default), 0.15 sends the same JSON plus a short id. The
default ``chunk_bytes`` of 400 000 keeps a chunk at or below a fifth of the default cap. Chunks are also
cut on what they queue per worker (``QUEUE_BUDGET_BYTES``, 65 536: the protobuf ``WorkerRequest`` plus its
8-byte length for 1.x/2.x, the JSON record for 0.15), 40% of the 163 840-byte cap of the published
OpenSVC template's ``config.toml``: with that cap a 400 000-byte chunk queued up to ~123 000 bytes on
2.x and ~400 000 on 0.15, and a 10 000-object file in one piece is never answered.
A record above ``MAX_RECORD_BYTES`` (``load_state`` reads through a 200 000-byte buffer, §3.8) is never
batched: it is sent on its own.

With a shared directory, live reads use one ``save_state`` (exact, see ``sozud.state.live``). Without,
some objects cannot be seen (backends of removed clusters, certificates no worker serves): objects of
the desired state that the read cannot see are counted as present once the main state accepted our own
request for them, so such a plan still converges; objects of that kind in sozu that the desired state
lacks cannot be removed (the report's notes say so).

A lost connection (``SozuConnectionError``) is not handled here: it propagates, and the caller
re-syncs after reconnecting. A timeout (the request's effect is unknown) ends the round like a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from sozud import serde
from sozud.errors import ConvergenceError, SozuRequestError, SozuTimeoutError, StateError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.redact import redact_text
from sozud.state.live import LiveRead, SozuRequester, derived_names, read_live_report
from sozud.state.model import ConfigState, ObjKey, add_request, describe
from sozud.state.plan import Plan, PlanStep, plan
from sozud.versions import Family, SozuVersion

if TYPE_CHECKING:
    from sozud.state.codec import RecordCache

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_RECORD_BYTES",
    "QUEUE_BUDGET_BYTES",
    "ApplyReport",
    "BatchResult",
    "StepResult",
    "apply_plan",
    "batch_chunks",
    "encode_records",
]

DEFAULT_CHUNK_BYTES = 400_000
MAX_RECORD_BYTES = 190_000  # load_state's 200 000-byte read buffer, minus a margin
# What one chunk may queue to each worker: 40% of the 163 840-byte max_command_buffer_size that the
# published OpenSVC template's config.toml sets (§11.10), so chunks fit that cap as well as the default.
QUEUE_BUDGET_BYTES = 65_536
DEFAULT_LOAD_STATE_TIMEOUT_S = 120.0  # sozu has no timeout of its own for load_state


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
    last_read: LiveRead | None = None  # the final re-read (what it could not see: ``hides``)
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


# --- the request counter --------------------------------------------------------------------------------


class _CountingChannel:
    """Forwards to a channel and counts the requests sent, by type."""

    def __init__(self, ch: SozuRequester) -> None:
        self.ch = ch
        self.counts: Counter[str] = Counter()

    @property
    def version(self) -> SozuVersion | None:
        return self.ch.version

    @property
    def epoch(self) -> int:
        return self.ch.epoch

    @property
    def socket_path(self) -> str | None:
        path = getattr(self.ch, "socket_path", None)
        return None if path is None else str(path)

    async def request(self, req: pb.Request, *, timeout_s: float | None = None) -> Any:
        self.counts[serde.request_kind(req)] += 1
        return await self.ch.request(req, timeout_s=timeout_s)


# --- apply -------------------------------------------------------------------------------------------------


async def apply_plan(
    ch: SozuRequester,
    desired: ConfigState,
    *,
    max_rounds: int = 3,
    shared_dir: str | None = None,
    shared_dir_sozu_path: str | None = None,
    batch_threshold: int = 200,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_removal_ratio: float = 0.5,
    force: bool = False,
    desired_is_complete: bool = True,
    raise_on_failure: bool = True,
    load_state_timeout_s: float = DEFAULT_LOAD_STATE_TIMEOUT_S,
    initial: LiveRead | None = None,
    records: RecordCache | None = None,
) -> ApplyReport:
    """Make the sozu behind ``ch`` hold ``desired``; see the module docstring.

    ``max_rounds``: rounds without progress before giving up. ``shared_dir`` (as sozud sees it) and
    ``shared_dir_sozu_path`` (as sozu sees it, default the same): exact live reads with one SaveState,
    and batch mode from ``batch_threshold`` steps on, in LoadState chunks of at most ``chunk_bytes``
    bytes of records, each given ``load_state_timeout_s``. ``max_removal_ratio``, ``force``,
    ``desired_is_complete``: the planner's safety valve, applied to every (re)plan. ``records``: the
    caller's cache of SaveState records (a re-read decodes only what changed).

    Raises ``UnsafePlanError`` (from the planner) when the safety valve refuses the plan and ``force``
    is false, before anything is sent; ``ConvergenceError`` when the live state still differs at the
    end (unless ``raise_on_failure`` is false: the report then has ``converged == False``); and lets
    ``SozuConnectionError`` through (the caller reconnects and re-syncs).
    """
    if max_rounds < 1:
        raise StateError(f"apply_plan: max_rounds must be at least 1, got {max_rounds}")
    started = time.monotonic()
    sozu_dir = shared_dir_sozu_path or shared_dir
    run = _Apply(
        ch,
        desired,
        shared_dir=shared_dir,
        sozu_dir=sozu_dir,
        max_removal_ratio=max_removal_ratio,
        force=force,
        desired_is_complete=desired_is_complete,
        records=records,
    )
    report = run.report
    # ``initial``: a read the caller knows to be current (it probed sozu since), saving one full read.
    live = initial if initial is not None else await run.read()
    current = run.replan(live)
    _preflight(ch, current)
    run.scope = _differing_keys(live.state, desired, run.assumed)
    report.plan_digest = current.digest()
    report.first_plan_steps = len(current.steps)
    run.log.info("sozu.apply_planned", steps=len(current.steps), plan=report.plan_digest[:12])

    # Rounds that end on a request the main state accepted (its workers refused it) made progress:
    # they do not count against max_rounds; a hard cap keeps the loop finite whatever happens.
    stalled = 0
    hard_cap = max_rounds + len(current.steps)
    round_no = 0
    while not current.is_empty and stalled < max_rounds and round_no < hard_cap:
        round_no += 1
        report.rounds = round_no
        if round_no == 1 and shared_dir is not None and len(current.steps) >= batch_threshold:
            assert sozu_dir is not None
            await _send_batches(run.cch, current.steps, shared_dir, sozu_dir, chunk_bytes, load_state_timeout_s, report)
            live = await run.read()
            current = run.replan(live)
            if current.is_empty:
                break
        _preflight(ch, current)
        # (a round whose every step was accepted but that leaves a diff behind made no progress either)
        if not await run.send_round(current, live, round_no):
            stalled += 1
        live = await run.read()
        current = run.replan(live)
    return run.finish(live, current, time.monotonic() - started, raise_on_failure=raise_on_failure)


class _Apply:
    """The state of one ``apply_plan`` call: reads made, objects assumed, the keys in scope, the report."""

    def __init__(
        self,
        ch: SozuRequester,
        desired: ConfigState,
        *,
        shared_dir: str | None,
        sozu_dir: str | None,
        max_removal_ratio: float,
        force: bool,
        desired_is_complete: bool,
        records: RecordCache | None = None,
    ) -> None:
        self.cch = _CountingChannel(ch)
        self.records = records
        self.desired = desired
        self.shared_dir = shared_dir
        self.sozu_dir = sozu_dir
        self.max_removal_ratio = max_removal_ratio
        self.force = force
        self.desired_is_complete = desired_is_complete
        self.log = get_logger()
        # Objects the read cannot see but that the main state took from our own requests.
        self.assumed: dict[ObjKey, Message] = {}
        self.scope: set[ObjKey] | None = None  # the keys the first plan changes; later rounds touch only those
        self.given_up: set[ObjKey] = set()  # changed objects whose new value sozu refused (old value restored)
        self.report = ApplyReport(plan_digest="", first_plan_steps=0, live_after=ConfigState(desired.version))

    async def read(self) -> LiveRead:
        r = await read_live_report(
            self.cch, shared_dir=self.shared_dir, shared_dir_sozu_path=self.sozu_dir, records=self.records
        )
        self.report.live_reads += 1
        for note in r.notes:
            if note not in self.report.notes:
                self.report.notes.append(note)
        return r

    def replan(self, r: LiveRead) -> Plan:
        view = r.state
        # Invisible objects, and without SaveState every certificate we set: the certificates query has
        # one entry per fingerprint, so a fingerprint held at two addresses shows one address's values.
        extra = {k: v for k, v in self.assumed.items() if r.hides(k, v) or (k[0] == "certificate" and not r.exact)}
        if extra:
            view = r.state.copy()
            view.objects.update(extra)
        target = self.desired
        if self.scope is not None:
            # A re-plan only finishes what the first plan set out to do: any other difference appeared
            # while we applied (an operator's request) and is left alone for the next sync to merge.
            target = view.copy()
            for k in self.scope:
                v = self.desired.objects.get(k)
                if v is None:
                    target.objects.pop(k, None)
                else:
                    target.objects[k] = v
        return plan(
            view,
            target,
            max_removal_ratio=self.max_removal_ratio,
            force=self.force,
            desired_is_complete=self.desired_is_complete,
        )

    async def send_round(self, current: Plan, live: LiveRead, round_no: int) -> bool:
        """Send ``current``'s steps until one fails; whether the round made progress (it ended on a
        request the main state accepted)."""
        replaced: dict[ObjKey, Message] = {}  # what this round removed to re-add with other values
        for step in current.steps:
            if step.action == "remove" and step.key in live.state.objects:
                replaced[step.key] = live.state.objects[step.key]
            result = await _send_one(self.cch, step, round_no, live)
            self.report.steps.append(result)
            _track(self.assumed, step, result, self.desired)
            if result.ok:
                continue
            if step.action == "add" and not result.main_accepted and step.key in replaced:
                await _restore(self.cch, step.key, replaced[step.key], round_no, self.report)
                self.given_up.add(step.key)
                if self.scope is not None:
                    self.scope.discard(step.key)  # not again: each try would take the route down for a moment
            self.log.warning(
                "sozu.apply_step_failed",
                round=round_no,
                request=result.kind,
                summary=result.summary,
                main_accepted=result.main_accepted,
                sozu_message=result.message,
            )
            return result.main_accepted
        return False

    def finish(self, live: LiveRead, current: Plan, duration_s: float, *, raise_on_failure: bool) -> ApplyReport:
        report = self.report
        report.converged = current.is_empty and not self.given_up
        report.remaining = current
        report.live_after = live.state
        report.last_read = live
        report.requests_by_type = dict(self.cch.counts)
        report.duration_s = duration_s
        self.log.info(
            "sozu.apply_done",
            converged=report.converged,
            rounds=report.rounds,
            applied=len(report.applied),
            failed=len(report.failures),
            remaining=len(current.steps),
            requests=report.requests_sent,
            duration_ms=round(report.duration_s * 1000, 2),
        )
        if not report.converged and raise_on_failure:
            raise ConvergenceError(_convergence_message(report))
        return report


def _preflight(ch: SozuRequester, current: Plan) -> None:
    """Refuse a plan holding a request sozu could never answer, before its first request is sent: a
    changed object is removed before its new value is added, and that add must not be the one to fail."""
    size_of = getattr(ch, "frame_size", None)
    limit = getattr(ch, "max_frame_bytes", None)
    if size_of is None or not isinstance(limit, int):
        return
    for i, step in enumerate(current.steps):
        n = size_of(step.request)
        if n is not None and n > limit:
            raise StateError(
                f"plan refused, nothing was sent: step {i} ({redact_text(step.summary)}) is a request of {n} "
                f"bytes, more than max_frame_bytes={limit} (sozu would never answer it)"
            )


async def _restore(cch: _CountingChannel, key: ObjKey, old: Message, round_no: int, report: ApplyReport) -> None:
    """A changed object was removed and its new value refused: put the old value back."""
    summary = f"restore {describe(key)} (its new value was refused)"
    result = await _send(cch, add_request(key, old), round_no, summary, key)
    report.steps.append(result)
    get_logger().error(
        "sozu.apply_restored" if result.ok else "sozu.apply_restore_failed",
        object=describe(key),
        sozu_message=result.message,
    )


def _differing_keys(live: ConfigState, desired: ConfigState, assumed: dict[ObjKey, Message]) -> set[ObjKey]:
    view = {**live.objects, **assumed}
    return {k for k in view.keys() | desired.objects.keys() if view.get(k) != desired.objects.get(k)}


def _convergence_message(report: ApplyReport) -> str:
    remaining = report.remaining
    left = [] if remaining is None else remaining.steps
    first_left = f" (first: {serde.request_kind(left[0].request)} {left[0].summary})" if left else ""
    restored = [s.summary for s in report.steps if s.summary.startswith("restore ")]
    if restored and not left:
        first_left = f"; {restored[0]}"
    failure = report.first_failure_text()
    why = f"; first failure: {failure}" if failure else ""
    return redact_text(
        f"sozu still differs from the desired state after {report.rounds} round(s): "
        f"{len(left)} step(s) remain{first_left}{why}"
    )


def _track(assumed: dict[ObjKey, Message], step: PlanStep, result: StepResult, desired: ConfigState) -> None:
    """Remember what the main state now holds because of our own request (for invisible objects)."""
    if not result.main_accepted or step.key is None:
        return
    key = tuple(step.key)
    kind = result.kind  # what was sent (an add_certificate may have gone as replace_certificate)
    if kind.startswith(("add_", "update_", "activate_", "deactivate_", "replace_")) and key in desired.objects:
        value = desired.objects[key]
        if (
            isinstance(value, pb.AddCertificate)
            and kind == "add_certificate"
            and not value.certificate.names
            and desired.version.family is not Family.V0_15
        ):
            # 1.x/2.x store the names derived from the certificate when sent empty (§6.5)
            stored = pb.AddCertificate()
            stored.CopyFrom(value)
            stored.certificate.names.extend(derived_names(value.certificate.certificate) or ())
            value = stored
        assumed[key] = value
    elif kind.startswith("remove_"):
        assumed.pop(key, None)


async def _send_one(cch: _CountingChannel, step: PlanStep, round_no: int, read: LiveRead) -> StepResult:
    key = tuple(step.key) if step.key is not None else None
    req = step.request
    summary = redact_text(step.summary)
    if req.WhichOneof("request_type") == "add_certificate" and key is not None and read.hides(key, req.add_certificate):
        # The read cannot tell whether this certificate is already at that address (shadowed, or on an
        # address without a listener). add_certificate would then be a no-op keeping the old names;
        # replace_certificate with old == new fingerprint stores it as sent either way (and adds it when
        # the address holds other certificates). Only when the address holds none does it fail on the
        # main state: then add_certificate is right.
        add = req.add_certificate
        replace = pb.Request()
        replace.replace_certificate.CopyFrom(
            pb.ReplaceCertificate(address=add.address, new_certificate=add.certificate, old_fingerprint=key[2])
        )
        result = await _send(cch, replace, round_no, summary + " (as replace_certificate: it may be there unseen)", key)
        if result.ok or result.main_accepted:
            return result
    return await _send(cch, req, round_no, summary, key)


async def _send(cch: _CountingChannel, req: pb.Request, round_no: int, summary: str, key: ObjKey | None) -> StepResult:
    kind = serde.request_kind(req)
    try:
        reply = await cch.request(req)
    except SozuRequestError as e:
        return StepResult(
            round=round_no,
            kind=kind,
            summary=summary,
            ok=False,
            message=redact_text(e.sozu_message),
            main_accepted=bool(e.processing),
            key=key,
        )
    except SozuTimeoutError as e:
        return StepResult(
            round=round_no,
            kind=kind,
            summary=summary,
            ok=False,
            message=f"no final answer in time, effect unknown ({e})",
            main_accepted=False,
            key=key,
        )
    message = reply.response.message if hasattr(reply, "response") else ""
    return StepResult(
        round=round_no, kind=kind, summary=summary, ok=True, message=str(message), main_accepted=True, key=key
    )


# --- batch mode -----------------------------------------------------------------------------------------


def encode_records(requests: Sequence[pb.Request], version: SozuVersion, *, first_id: int = 0) -> list[bytes]:
    """Each request as one state-file record: compact ``WorkerRequest`` JSON followed by ``\\n\\0``."""
    out = []
    for i, req in enumerate(requests):
        record = {"id": f"SOZUD-{first_id + i}", "content": serde.to_json(req, version)}
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        out.append(text.encode("utf-8") + b"\n\0")
    return out


def batch_chunks(
    requests: Sequence[pb.Request],
    version: SozuVersion,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    queue_budget: int = QUEUE_BUDGET_BYTES,
) -> list[tuple[int, list[bytes]]]:
    """The state-file chunks batch mode sends, cut on both the file size and what each queues to a worker."""
    records = encode_records(requests, version)
    if version.family is Family.V0_15:
        queued = [len(r) for r in records]  # 0.15 forwards the JSON record
    else:  # 1.x/2.x forward a length-prefixed protobuf WorkerRequest
        queued = [
            len(pb.WorkerRequest(id=f"SOZUD-{i}", content=req).SerializeToString()) + 8
            for i, req in enumerate(requests)
        ]
    return _chunks(records, chunk_bytes, queued, queue_budget)


def _chunks(
    records: Sequence[bytes],
    chunk_bytes: int,
    queued: Sequence[int] | None = None,
    queue_budget: int | None = None,
) -> list[tuple[int, list[bytes]]]:
    """Consecutive runs of records, each at most ``chunk_bytes`` (a lone bigger record is left out) and,
    with ``queued`` (per-record bytes queued to a worker), at most ``queue_budget`` queued bytes."""
    chunks: list[tuple[int, list[bytes]]] = []
    current: list[bytes] = []
    start, size, load = 0, 0, 0
    for i, rec in enumerate(records):
        q = queued[i] if queued is not None else 0
        if len(rec) > MAX_RECORD_BYTES or len(rec) > chunk_bytes:
            # never batched: close the current chunk; the record goes one by one after the batches
            if current:
                chunks.append((start, current))
            start, current, size, load = i + 1, [], 0, 0
            continue
        over_budget = queue_budget is not None and load + q > queue_budget
        if current and (size + len(rec) > chunk_bytes or over_budget):
            chunks.append((start, current))
            start, current, size, load = i, [], 0, 0
        current.append(rec)
        size += len(rec)
        load += q
    if current:
        chunks.append((start, current))
    return chunks


async def _send_batches(
    cch: _CountingChannel,
    steps: Sequence[PlanStep],
    shared_dir: str,
    sozu_dir: str,
    chunk_bytes: int,
    load_state_timeout_s: float,
    report: ApplyReport,
) -> None:
    version = cch.version
    if version is None:
        raise StateError("apply_plan: the channel's sozu version is unknown (connect first)")
    log = get_logger()
    for index, (first, chunk) in enumerate(batch_chunks([s.request for s in steps], version, chunk_bytes)):
        name = f".sozud-apply-{os.getpid()}-{secrets.token_hex(8)}-{index}.state"
        local_path = os.path.join(shared_dir, name)
        sozu_path = os.path.join(sozu_dir, name)
        data = b"".join(chunk)
        try:
            # private (certificates carry keys), created exclusively under a random name
            fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            report.notes.append(f"batch mode abandoned: cannot write {local_path}: {e}")
            log.warning("sozu.apply_batch_unwritable", path=local_path, error=str(e))
            return
        try:
            ok, message = True, ""
            try:
                reply = await cch.request(pb.Request(load_state=sozu_path), timeout_s=load_state_timeout_s)
                message = str(reply.response.message)
            except SozuRequestError as e:
                ok, message = False, redact_text(e.sozu_message)
            except SozuTimeoutError as e:
                report.batches.append(
                    BatchResult(index, first, len(chunk), len(data), False, f"no answer in time ({e})")
                )
                log.warning(
                    "sozu.apply_batch_timeout",
                    chunk=index,
                    steps=len(chunk),
                    hint="sozu answers no load_state of this size when max_command_buffer_size is small (the "
                    "published template's 163840 overflows its worker channels): raise it to 2000000 in sozu's "
                    "config.toml; sozud goes on one request at a time",
                )
                return
        finally:
            try:
                os.unlink(local_path)
            except OSError as e:
                log.warning("sozu.apply_batch_cleanup_failed", path=local_path, error=str(e))
        report.batches.append(BatchResult(index, first, len(chunk), len(data), ok, message))
        log.info("sozu.apply_batch", chunk=index, steps=len(chunk), bytes=len(data), ok=ok, sozu_message=message)
