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

**Batch mode** (a shared directory and a plan of at least ``batch_threshold`` steps): the first
round sends the plan as ``load_state`` chunks (:mod:`sozud.state.batch`), then reads and plans again
and sends what remains one request at a time, where every failure is attributed to its request.

With a shared directory, live reads use one ``save_state`` (exact, see ``sozud.state.live``). Without,
some objects cannot be seen (backends of removed clusters, certificates no worker serves): objects of
the desired state that the read cannot see are counted as present once the main state accepted our own
request for them, so such a plan still converges; objects of that kind in sozu that the desired state
lacks cannot be removed (the report's notes say so).

**Scope.** Every re-plan only finishes what the first plan set out to do: it plans the keys the first
plan changed (``plan(..., scope=)``), so a change an operator makes meanwhile is left for the next sync,
and a round costs O(keys changed) rather than O(state). A caller that knows where live and desired can
differ passes ``scope=`` to ``apply_plan``: the first plan is then of those keys too (and what differs
outside them is left alone), and no step of a clean apply from an exact read walks the whole state
(a predicted round copies the live mapping once).

A lost connection (``SozuConnectionError``) is not handled here: it propagates, and the caller
re-syncs after reconnecting. A timeout (the request's effect is unknown) ends the round like a failure.

The report's types live in :mod:`sozud.state.apply_report`, batch mode in :mod:`sozud.state.batch`;
both are re-exported here.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from sozud import serde
from sozud.errors import ConvergenceError, SozuRequestError, SozuTimeoutError, StateError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.redact import redact_text
from sozud.state.apply_report import ApplyReport, BatchResult, StepResult
from sozud.state.batch import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_LOAD_STATE_TIMEOUT_S,
    MAX_RECORD_BYTES,
    QUEUE_BUDGET_BYTES,
    batch_chunks,
    encode_records,
    send_batches,
)
from sozud.state.batch import _chunks as _chunks  # tests check the chunking rule directly
from sozud.state.live import ClusterReplies, LiveRead, SozuRequester, derived_names, read_live_report
from sozud.state.model import ConfigState, ObjKey, add_request, apply_request, describe, encode_value
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
    scope: Collection[ObjKey] | None = None,
    clusters: ClusterReplies | None = None,
) -> ApplyReport:
    """Make the sozu behind ``ch`` hold ``desired``; see the module docstring.

    ``max_rounds``: rounds without progress before giving up. ``shared_dir`` (as sozud sees it) and
    ``shared_dir_sozu_path`` (as sozu sees it, default the same): exact live reads with one SaveState,
    and batch mode from ``batch_threshold`` steps on, in LoadState chunks of at most ``chunk_bytes``
    bytes of records, each given ``load_state_timeout_s``. ``max_removal_ratio``, ``force``,
    ``desired_is_complete``: the planner's safety valve, applied to every (re)plan. ``records``: the
    caller's cache of SaveState records (a re-read decodes only what changed); ``clusters``: without a shared
    directory, the caller's cluster replies (a re-read queries only the clusters that changed). ``scope``: the caller
    guarantees that live already equals ``desired`` outside these keys (e.g. the keys a merge changed);
    planning then costs O(len(scope)) instead of O(len(live)) (see ``plan(..., scope=)``), and
    differences outside the scope are left alone.

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
        scope=scope,
        clusters=clusters,
    )
    report = run.report
    # ``initial``: a read the caller knows to be current (it probed sozu since), saving one full read.
    live = initial if initial is not None else await run.read()
    current = run.replan(live)
    _preflight(ch, current)
    run.scope = _differing_keys(live.state, desired, run.assumed, run.scope)
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
            await send_batches(run.cch, current.steps, shared_dir, sozu_dir, chunk_bytes, load_state_timeout_s, report)
            live = await run.read()
            current = run.replan(live)
            if current.is_empty:
                break
        _preflight(ch, current)
        # (a round whose every step was accepted but that leaves a diff behind made no progress either)
        progressed, all_ok = await run.send_round(current, live, round_no)
        if not progressed:
            stalled += 1
        predicted = run.predict(live, current) if all_ok else None
        if predicted is not None:
            live, current = predicted
        else:
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
        scope: Collection[ObjKey] | None = None,
        clusters: ClusterReplies | None = None,
    ) -> None:
        self.cch = _CountingChannel(ch)
        self.records = records
        self.clusters = clusters
        self.desired = desired
        self.shared_dir = shared_dir
        self.sozu_dir = sozu_dir
        self.max_removal_ratio = max_removal_ratio
        self.force = force
        self.desired_is_complete = desired_is_complete
        self.log = get_logger()
        # Objects the read cannot see but that the main state took from our own requests.
        self.assumed: dict[ObjKey, Message] = {}
        # The keys planned: the caller's scope for the first plan (None: every key), then the keys the
        # first plan changes (later rounds touch only those).
        self.scope: set[ObjKey] | None = None if scope is None else set(scope)
        self.given_up: set[ObjKey] = set()  # changed objects whose new value sozu refused (old value restored)
        self.report = ApplyReport(plan_digest="", first_plan_steps=0, live_after=ConfigState(desired.version))

    async def read(self) -> LiveRead:
        r = await read_live_report(
            self.cch,
            shared_dir=self.shared_dir,
            shared_dir_sozu_path=self.sozu_dir,
            records=self.records,
            clusters=self.clusters,
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
            view = r.state.shallow_copy()
            view.update(extra)
        # A re-plan only finishes what the first plan set out to do (the scope): any other difference
        # appeared while we applied (an operator's request) and is left alone for the next sync to merge.
        return plan(
            view,
            self.desired,
            max_removal_ratio=self.max_removal_ratio,
            force=self.force,
            desired_is_complete=self.desired_is_complete,
            scope=self.scope,
        )

    def predict(self, live: LiveRead, sent: Plan) -> tuple[LiveRead, Plan] | None:
        """What sozu holds after accepting every step of ``sent`` from ``live``, without reading it again,
        and the (empty) plan from it: only from an exact read (SaveState), and only when the planner agrees
        nothing is left (else None: read). Costs one copy of the live mapping, the steps, and a plan of
        the scope. The adapter keeps the prediction as its cached read only when sozu's request counters
        show that nothing but these requests reached sozu (``sozud.adapters.SozuAdapter.apply``)."""
        if not live.exact:
            return None
        state = live.state.shallow_copy()
        try:
            for step in sent.steps:
                apply_request(state, step.request)
        except StateError:
            return None
        predicted = LiveRead(state=state, method=live.method, requests=0)
        remaining = self.replan(predicted)
        if not remaining.is_empty:
            return None
        self.report.predicted_reads += 1
        return predicted, remaining

    async def send_round(self, current: Plan, live: LiveRead, round_no: int) -> tuple[bool, bool]:
        """Send ``current``'s steps until one fails: whether the round made progress (it ended on a
        request the main state accepted), and whether every step was accepted."""
        replaced: dict[ObjKey, Message] = {}  # what this round removed to re-add with other values
        for step in current.steps:
            if step.action == "remove" and step.key in live.state:
                replaced[step.key] = live.state[step.key]
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
            return result.main_accepted, False
        return False, True

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


def _differing_keys(
    live: ConfigState, desired: ConfigState, assumed: dict[ObjKey, Message], scope: set[ObjKey] | None
) -> set[ObjKey]:
    """The keys where live (with what we assume it holds) and desired differ, among ``scope`` (None:
    every key: a full pass over both states)."""
    ours = {k: encode_value(v) for k, v in assumed.items()}  # values compared as canonical bytes
    if scope is None:
        have, want = live.raw_map(), desired.raw_map()
        keys = have.keys() | ours.keys() | want.keys()
        return {k for k in keys if (ours[k] if k in ours else have.get(k)) != want.get(k)}
    # a scope: point reads
    return {k for k in scope if (ours[k] if k in ours else live.raw(k)) != desired.raw(k)}


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
    if kind.startswith(("add_", "update_", "activate_", "deactivate_", "replace_")) and key in desired:
        value = desired[key]
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

    def failed(message: str, main_accepted: bool) -> StepResult:
        return StepResult(
            round=round_no, kind=kind, summary=summary, ok=False, message=message, main_accepted=main_accepted, key=key
        )

    try:
        reply = await cch.request(req)
    except SozuRequestError as e:
        return failed(redact_text(e.sozu_message), bool(e.processing))
    except SozuTimeoutError as e:
        return failed(f"no final answer in time, effect unknown ({e})", False)
    message = reply.response.message if hasattr(reply, "response") else ""
    return StepResult(
        round=round_no, kind=kind, summary=summary, ok=True, message=str(message), main_accepted=True, key=key
    )
