"""The delta between two states as an ordered list of sozu requests (docs/sozu-command-protocol.md §9.2).

:func:`plan` turns ``live`` (what sozu runs) and ``desired`` into the requests that take sozu from one
to the other, in an order sozu's main state and workers accept, with as few requests as sozu's
identity rules allow.

Order (make before break)
    1. new listeners: ``add_*_listener`` then ``activate_listener`` when desired active;
    2. changed listeners: 2.x ``update_*_listener`` when every changed field can be patched (see
       :func:`_listener_patch`), plus ``activate_listener`` when it becomes active; otherwise the
       rebuild of §9.2: remove its frontends (and, HTTPS, its certificates), ``deactivate_listener``
       when active, ``remove_listener``, ``add_*_listener``, ``activate_listener`` when desired active;
       its frontends and certificates come back in steps 4 and 6;
    3. new and changed clusters: ``add_cluster`` (an upsert);
    4. certificates: a renewal (same address and names, new fingerprint) is one ``replace_certificate``;
       a changed certificate with the same fingerprint (names, versions, chain) is one
       ``replace_certificate`` whose old and new fingerprints are equal; new ones ``add_certificate``;
    5. new and changed backends: ``add_backend`` (an upsert on (cluster_id, backend_id, address));
    6. frontends: a changed HTTP/HTTPS frontend is removed (with its *stored* values, position
       included: workers remove by hostname, path, method and position) then added; new ones added;
       TCP/UDP frontends, see below;
    7. removals, in reverse dependency order: frontends, backends, certificates, clusters, then
       listeners (``deactivate_listener`` when active, then ``remove_listener``); last, listeners that
       stay but become inactive are deactivated. Frontends and certificates that ``desired`` keeps on
       the address of a removed listener are left alone: sozu's main state keeps such orphans, and
       ``desired`` asks for them.

TCP/UDP frontends
    sozu's main state refuses a duplicate (cluster_id, address, tags) but ``remove_tcp_frontend``
    removes *every* frontend of the cluster at that address, whatever its tags (``retain(|f|
    f.address != address)`` in ``command/src/state.rs``, identical for UDP). So all frontends of one
    (cluster_id, address) group are planned together: when any of them goes, one remove request
    clears the group and the ones that must stay are added again right after.

Backends
    The main state removes a backend by (cluster_id, backend_id, address), but workers remove by
    (cluster_id, address) (§7.2): removing one of two backends that share an address in a cluster
    would take both out of the workers. The survivor is sent again (``add_backend``, a no-op on the
    main state) right after the removals.

Cost (requests per changed object)
    One request: a new, changed (upsert) or removed cluster or backend; a new or removed HTTP/HTTPS
    frontend, certificate or inactive listener; a renewed or otherwise changed certificate
    (``replace_certificate``); an activation change; a patchable 2.x listener change (plus one
    when its activation changes too); a new TCP/UDP frontend; the removal of the last frontend of a
    (cluster_id, address) group. More than one:

    - a new active listener: 2 (add, activate); removing an active listener: 2 (deactivate, remove);
    - a changed HTTP/HTTPS frontend (cluster_id, position, tags or any 2.x field): 2 (remove, add),
      since none of those is part of sozu's route key;
    - a TCP/UDP frontend whose tags change: 2 (remove, add); removing one frontend of a group that
      keeps others: 1 + the number kept (they are re-added);
    - removing a backend that shares its (cluster_id, address) with kept backends: 1 + one re-add
      per kept sibling;
    - a listener change that cannot be patched (any 1.x/0.15 change, TLS material, ``hsts``
      removal, ...): deactivate (if active) + remove + add + activate (if active), plus one remove
      and one add for each frontend and certificate on it.

Safety valve
    :class:`~sozud.errors.UnsafePlanError` unless ``force``: when the plan removes anything while
    ``desired`` is empty or ``desired_is_complete`` is False (a truncated shared state must never
    remove live objects), or removes more than ``max_removal_ratio`` of the live objects.

Every plan is checked before it is returned: it is replayed on a copy of ``live`` with sozu's
main-state rules (:func:`model.apply_request`), each request must be accepted and the result must
equal ``desired``; every request must be a complete proto2 message and known to the live version.
Private keys never appear in a summary, :meth:`Plan.to_table` or :meth:`Plan.to_json`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from sozud import serde
from sozud.errors import StateError, UnsafePlanError, VersionMismatchError
from sozud.proto import command_pb2 as pb
from sozud.redact import REDACTED, redact_text
from sozud.state.model import (
    FRONTEND_KIND_OF_LISTENER,
    LISTENER_TYPES,
    LISTENER_UPDATE_REQUEST,
    ConfigState,
    ObjKey,
    add_request,
    apply_request,
    describe,
    object_address,
)
from sozud.versions import V2_1_0, Family, SozuVersion

__all__ = ["ACTIONS", "Plan", "PlanStep", "StateDiff", "diff", "plan"]

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

    @property
    def requests(self) -> list[pb.Request]:
        return [s.request for s in self.steps]

    def digest(self) -> str:
        """Stable sha-256 hex of the ordered requests (for logs; 16 hex digits are plenty there)."""
        h = hashlib.sha256()
        for step in self.steps:
            data = step.request.SerializeToString(deterministic=True)
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        """Number of requests per request type."""
        out: dict[str, int] = {}
        for step in self.steps:
            out[step.request_type] = out.get(step.request_type, 0) + 1
        return out

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


# --- diff --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateDiff:
    """Keys added, removed and changed from ``a`` to ``b`` (each sorted)."""

    added: list[ObjKey]
    removed: list[ObjKey]
    changed: list[ObjKey]

    def __len__(self) -> int:
        return len(self.added) + len(self.removed) + len(self.changed)


def diff(a: ConfigState, b: ConfigState) -> StateDiff:
    """Object-level difference between two states (values compared as messages)."""
    ao, bo = a.objects, b.objects
    return StateDiff(
        added=sorted(k for k in bo if k not in ao),
        removed=sorted(k for k in ao if k not in bo),
        changed=sorted(k for k, v in ao.items() if k in bo and bo[k] != v),
    )


# --- the planner ---------------------------------------------------------------------------------------


def plan(
    live: ConfigState,
    desired: ConfigState,
    *,
    max_removal_ratio: float = 0.5,
    force: bool = False,
    desired_is_complete: bool = True,
) -> Plan:
    """The requests that take sozu from ``live`` to ``desired`` (module docstring for order and cost).

    ``max_removal_ratio``: refuse a plan that removes more than this share of the live objects.
    ``force``: skip the safety valve. ``desired_is_complete``: False when ``desired`` may be a
    truncated or partial state (e.g. its published record count or digest did not match): then
    nothing may be removed. Raises :class:`UnsafePlanError` (safety valve),
    :class:`VersionMismatchError` (desired needs something the live sozu version does not have) and
    :class:`StateError` (an internal inconsistency: a plan that would not reach ``desired``).
    """
    version = live.version
    if (version.family is Family.V0_15) != (desired.version.family is Family.V0_15):
        raise VersionMismatchError(
            f"cannot plan from a sozu {version} live state to a sozu {desired.version} desired state: "
            "0.15 and 1.x/2.x state files and requests are not compatible"
        )
    d = diff(live, desired)
    result = Plan(version=version, removals=d.removed, additions=d.added, changes=d.changed)
    _safety_valve(
        live, desired, d, max_removal_ratio=max_removal_ratio, force=force, desired_is_complete=desired_is_complete
    )
    if not d:
        return result
    builder = _Builder(live, desired)
    builder.run()
    result.steps = builder.steps
    _check_requests(result)
    return result


def _safety_valve(
    live: ConfigState,
    desired: ConfigState,
    d: StateDiff,
    *,
    max_removal_ratio: float,
    force: bool,
    desired_is_complete: bool,
) -> None:
    if force or not d.removed:
        return
    n, total = len(d.removed), len(live)
    sample = ", ".join(describe(k) for k in d.removed[:5]) + (", ..." if n > 5 else "")
    if len(desired) == 0:
        raise UnsafePlanError(
            f"plan refused: the desired state is empty and would remove all {n} live objects ({sample}); "
            "an empty or unreadable shared state never removes live objects; use --force to apply it anyway"
        )
    if not desired_is_complete:
        raise UnsafePlanError(
            f"plan refused: the desired state may be incomplete (truncated or partial) and the plan would "
            f"remove {n} of the {total} live objects ({sample}); only additions and changes are applied "
            "from such a state; use --force to apply the removals anyway"
        )
    if n > max_removal_ratio * total:
        raise UnsafePlanError(
            f"plan refused: it would remove {n} of the {total} live objects ({100 * n / total:.0f}%, more "
            f"than max_removal_ratio={max_removal_ratio:g}): {sample}; use --force to apply it anyway"
        )


def _check_requests(result: Plan) -> None:
    version = result.version
    for i, step in enumerate(result.steps):
        kind = step.request_type
        if not version.knows_request(kind):
            raise VersionMismatchError(f"step {i} ({step.summary}) needs {kind}, which sozu {version} does not have")
        if not step.request.IsInitialized():
            missing = ", ".join(getattr(step.request, "FindInitializationErrors")())  # noqa: B009
            raise StateError(f"step {i} ({step.summary}) is an incomplete request: missing {missing}")
        if version < V2_1_0:
            try:
                serde.to_json(step.request, version)
            except StateError as e:
                raise VersionMismatchError(f"step {i} ({step.summary}) cannot be sent to sozu {version}: {e}") from None


_LISTENER_ORDER = {"http": 0, "https": 1, "tcp": 2, "udp": 3}
_PATCH_SKIP = frozenset({"address", "active"})


def _listener_sort(key: ObjKey, value: Message) -> tuple[Any, ...]:
    return (_LISTENER_ORDER.get(key[1], 9), serde.address_sort_key(getattr(value, "address")))  # noqa: B009


class _Builder:
    """Builds the steps while replaying them on a working copy of live (``self.work``)."""

    def __init__(self, live: ConfigState, desired: ConfigState) -> None:
        self.version = live.version
        self.work = ConfigState(live.version, dict(live.objects))
        self.desired = desired.objects
        self.steps: list[PlanStep] = []

    # -- emitting

    def emit(self, req: pb.Request, action: str, key: ObjKey, note: str = "") -> None:
        kind = req.WhichOneof("request_type") or "empty"
        try:
            apply_request(self.work, req)
        except StateError as e:
            raise StateError(f"planner produced a request sozu would refuse ({kind} {describe(key)}): {e}") from None
        summary = f"{kind} {describe(key)}" + (f" ({note})" if note else "")
        self.steps.append(PlanStep(request=req, action=action, key=key, summary=summary))

    def keys(self, kind: str, where: dict[ObjKey, Message]) -> list[ObjKey]:
        return sorted(k for k in where if k[0] == kind)

    # -- phases

    def run(self) -> None:
        deactivate_later: list[ObjKey] = []
        self.new_listeners()
        self.changed_listeners(deactivate_later)
        self.upserts("cluster")
        self.certificates()
        self.upserts("backend")
        self.http_frontends("http_frontend")
        self.http_frontends("https_frontend")
        self.l4_frontends("tcp_frontend")
        self.l4_frontends("udp_frontend")
        self.removals(deactivate_later)
        if not self.work.same_as(ConfigState(self.version, self.desired)):
            left = diff(self.work, ConfigState(self.version, self.desired))
            sample = [describe(k) for k in (left.added + left.removed + left.changed)[:5]]
            raise StateError(f"planner error: the plan does not reach the desired state ({sample})")

    def new_listeners(self) -> None:
        items = [(k, v) for k, v in self.desired.items() if k[0] == "listener" and k not in self.work.objects]
        for key, value in sorted(items, key=lambda kv: _listener_sort(*kv)):
            self.emit(add_request(key, value), "add", key)
            if getattr(value, "active"):  # noqa: B009
                self.emit(_activation(key, value, True), "activate", key)

    def changed_listeners(self, deactivate_later: list[ObjKey]) -> None:
        items = [
            (k, v)
            for k, v in self.desired.items()
            if k[0] == "listener" and k in self.work.objects and self.work.objects[k] != v
        ]
        for key, want in sorted(items, key=lambda kv: _listener_sort(*kv)):
            have = self.work.objects[key]
            want_active = bool(getattr(want, "active"))  # noqa: B009
            have_active = bool(getattr(have, "active"))  # noqa: B009
            patch = _listener_patch(self.version, key, have, want)
            if patch is None and _same_but_active(have, want):
                patch = _empty_patch(key, want)
            if patch is not None:
                if len(patch.ListFields()) > 1:  # more than the address
                    req = pb.Request()
                    getattr(req, LISTENER_UPDATE_REQUEST[key[1]]).CopyFrom(patch)
                    self.emit(req, "update", key)
                if want_active and not have_active:
                    self.emit(_activation(key, want, True), "activate", key)
                elif have_active and not want_active:
                    deactivate_later.append(key)
                continue
            self.rebuild_listener(key, have, want)

    def rebuild_listener(self, key: ObjKey, have: Message, want: Message) -> None:
        addr = key[2]
        fkind = FRONTEND_KIND_OF_LISTENER[key[1]]
        note = "listener rebuilt"
        fronts = [k for k in self.work.objects if k[0] == fkind and object_address(k) == addr]
        if fkind in ("http_frontend", "https_frontend"):
            for k in sorted(fronts):
                self.emit(_remove_frontend(k, self.work.objects[k]), "remove", k, note)
        else:
            for cluster in sorted({k[1] for k in fronts}):
                group = sorted(k for k in fronts if k[1] == cluster)
                self.emit(_remove_frontend(group[0], self.work.objects[group[0]]), "remove", group[0], note)
        if key[1] == "https":
            for k in sorted(k for k in self.work.objects if k[0] == "certificate" and k[1] == addr):
                self.emit(_remove_certificate(k, self.work.objects[k]), "remove", k, note)
        if getattr(have, "active"):  # noqa: B009
            self.emit(_activation(key, have, False), "deactivate", key, note)
        self.emit(_remove_listener(key, have), "remove", key, note)
        self.emit(add_request(key, want), "add", key, note)
        if getattr(want, "active"):  # noqa: B009
            self.emit(_activation(key, want, True), "activate", key, note)

    def upserts(self, kind: str) -> None:
        for key in self.keys(kind, self.desired):
            want = self.desired[key]
            have = self.work.objects.get(key)
            if have is None:
                self.emit(add_request(key, want), "add", key)
            elif have != want:
                self.emit(add_request(key, want), "update", key)

    def certificates(self) -> None:
        work, desired = self.work.objects, self.desired
        to_add = [k for k in self.keys("certificate", desired) if k not in work]
        to_remove = [k for k in self.keys("certificate", work) if k not in desired]
        # renewals: same address and names, new fingerprint -> one replace_certificate
        olds: dict[tuple[str, tuple[str, ...]], list[ObjKey]] = {}
        for k in to_remove:
            olds.setdefault((k[1], _names(work[k])), []).append(k)
        for k in to_add:
            group = olds.get((k[1], _names(desired[k])))
            if group:
                old = group.pop(0)
                self.emit(_replace_certificate(k, desired[k], old[2]), "replace", k, f"renews sha256:{old[2][:16]}")
            else:
                self.emit(add_request(k, desired[k]), "add", k)
        for k in self.keys("certificate", desired):
            if k in work and work[k] != desired[k]:
                self.emit(_replace_certificate(k, desired[k], k[2]), "replace", k, "same fingerprint, new metadata")

    def http_frontends(self, kind: str) -> None:
        for key in self.keys(kind, self.desired):
            want = self.desired[key]
            have = self.work.objects.get(key)
            if have is None:
                self.emit(add_request(key, want), "add", key)
            elif have != want:
                self.emit(_remove_frontend(key, have), "remove", key, "changed: remove then add")
                self.emit(add_request(key, want), "add", key, "changed")

    def l4_frontends(self, kind: str) -> None:
        work, desired = self.work.objects, self.desired
        groups: dict[tuple[str, str], tuple[list[ObjKey], list[ObjKey]]] = {}
        for k in work:
            if k[0] == kind:
                groups.setdefault((k[1], k[2]), ([], []))[0].append(k)
        for k in desired:
            if k[0] == kind:
                groups.setdefault((k[1], k[2]), ([], []))[1].append(k)
        for _, (have, want) in sorted(groups.items()):
            going = [k for k in have if k not in desired]
            if going and want:
                doomed = sorted(going)[0]
                self.emit(_remove_frontend(doomed, work[doomed]), "remove", doomed, "clears its (cluster, address)")
                for k in want:  # desired insertion order
                    note = "" if k not in have else "kept: re-added after the group's removal"
                    self.emit(add_request(k, desired[k]), "add", k, note)
            elif not going:
                for k in want:
                    if k not in work:
                        self.emit(add_request(k, desired[k]), "add", k)
            # going and not want: a pure removal, done in the removal phase

    def removals(self, deactivate_later: list[ObjKey]) -> None:
        work, desired = self.work.objects, self.desired
        for kind in ("http_frontend", "https_frontend"):
            for k in [k for k in self.keys(kind, work) if k not in desired]:
                self.emit(_remove_frontend(k, work[k]), "remove", k)
        for kind in ("tcp_frontend", "udp_frontend"):
            seen: set[tuple[str, str]] = set()
            for k in [k for k in self.keys(kind, work) if k not in desired]:
                if (k[1], k[2]) not in seen:
                    seen.add((k[1], k[2]))
                    self.emit(_remove_frontend(k, work[k]), "remove", k)
        readd: set[ObjKey] = set()
        by_address: dict[tuple[str, str], list[ObjKey]] = {}
        for k in work:
            if k[0] == "backend" and k in desired:
                by_address.setdefault((k[1], k[3]), []).append(k)
        for k in [k for k in self.keys("backend", work) if k not in desired]:
            self.emit(_remove_backend(k, work[k]), "remove", k)
            readd.update(by_address.get((k[1], k[3]), ()))
        for k in sorted(readd):
            if k in self.work.objects:
                self.emit(add_request(k, desired[k]), "add", k, "re-added: workers remove backends by address")
        for k in [k for k in self.keys("certificate", work) if k not in desired]:
            self.emit(_remove_certificate(k, work[k]), "remove", k)
        for k in [k for k in self.keys("cluster", work) if k not in desired]:
            req = pb.Request()
            req.remove_cluster = k[1]
            self.emit(req, "remove", k)
        gone = [(k, v) for k, v in work.items() if k[0] == "listener" and k not in desired]
        for k, v in sorted(gone, key=lambda kv: _listener_sort(*kv)):
            if getattr(v, "active"):  # noqa: B009
                self.emit(_activation(k, v, False), "deactivate", k)
            self.emit(_remove_listener(k, v), "remove", k)
        for k in deactivate_later:
            self.emit(_activation(k, self.work.objects[k], False), "deactivate", k)


# --- request builders ------------------------------------------------------------------------------------


def _address(value: Message) -> pb.SocketAddress:
    addr = getattr(value, "address")  # noqa: B009
    assert isinstance(addr, pb.SocketAddress)
    return addr


def _activation(key: ObjKey, value: Message, active: bool) -> pb.Request:
    req = pb.Request()
    if active:
        req.activate_listener.CopyFrom(
            pb.ActivateListener(address=_address(value), proxy=LISTENER_TYPES[key[1]], from_scm=False)
        )
    else:
        req.deactivate_listener.CopyFrom(
            pb.DeactivateListener(address=_address(value), proxy=LISTENER_TYPES[key[1]], to_scm=False)
        )
    return req


def _remove_listener(key: ObjKey, value: Message) -> pb.Request:
    req = pb.Request()
    req.remove_listener.CopyFrom(pb.RemoveListener(address=_address(value), proxy=LISTENER_TYPES[key[1]]))
    return req


def _remove_frontend(key: ObjKey, value: Message) -> pb.Request:
    """The removal of any frontend (HTTP, HTTPS, TCP, UDP): its stored values, position included."""
    req = pb.Request()
    getattr(req, f"remove_{key[0]}").CopyFrom(value)
    return req


def _remove_backend(key: ObjKey, value: Message) -> pb.Request:
    assert isinstance(value, pb.AddBackend)
    req = pb.Request()
    req.remove_backend.CopyFrom(
        pb.RemoveBackend(cluster_id=value.cluster_id, backend_id=value.backend_id, address=value.address)
    )
    return req


def _remove_certificate(key: ObjKey, value: Message) -> pb.Request:
    assert isinstance(value, pb.AddCertificate)
    req = pb.Request()
    req.remove_certificate.CopyFrom(pb.RemoveCertificate(address=value.address, fingerprint=key[2]))
    return req


def _replace_certificate(key: ObjKey, value: Message, old_fingerprint: str) -> pb.Request:
    assert isinstance(value, pb.AddCertificate)
    req = pb.Request()
    req.replace_certificate.CopyFrom(
        pb.ReplaceCertificate(address=value.address, new_certificate=value.certificate, old_fingerprint=old_fingerprint)
    )
    return req


def _names(value: Message) -> tuple[str, ...]:
    assert isinstance(value, pb.AddCertificate)
    return tuple(sorted(value.certificate.names))


# --- listener patches ---------------------------------------------------------------------------------------


def _same_but_active(have: Message, want: Message) -> bool:
    masked = type(want)()
    masked.CopyFrom(want)
    setattr(masked, "active", getattr(have, "active"))  # noqa: B009, B010
    return masked == have


def _empty_patch(key: ObjKey, want: Message) -> Message:
    """A patch that changes nothing (only the address): the change is the activation alone."""
    patch: Any = type(getattr(pb.Request(), LISTENER_UPDATE_REQUEST[key[1]]))()
    patch.address.CopyFrom(_address(want))
    assert isinstance(patch, Message)
    return patch


def _listener_patch(version: SozuVersion, key: ObjKey, have: Message, want: Message) -> Message | None:
    """An ``Update*ListenerConfig`` that turns ``have`` into ``want`` (``active`` aside), or None.

    None when the version has no update request or one changed field cannot be expressed as a patch:
    a field the update message lacks (address, TLS material, tickets, 0.15 answers), a field that goes
    from set to unset (an absent patch field means "keep"), an h2 knob of 0 (refused), an
    ``http_answers`` that would have to lose an answer (answers are merged), an ``answers`` map that
    loses a key or has an empty value (empty means keep), or an empty ``alpn_protocols`` (means reset
    to the default list).
    """
    update_kind = LISTENER_UPDATE_REQUEST[key[1]]
    if not version.knows_request(update_kind):
        return None
    patch: Any = type(getattr(pb.Request(), update_kind))()
    patch_desc = patch.DESCRIPTOR
    patch.address.CopyFrom(_address(want))
    for fd in want.DESCRIPTOR.fields:
        name = fd.name
        if name in _PATCH_SKIP:
            continue
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        if fd.is_repeated or is_map:
            hv, wv = getattr(have, name), getattr(want, name)
            if (dict(hv) if is_map else list(hv)) == (dict(wv) if is_map else list(wv)):
                continue
        else:
            h_set, w_set = have.HasField(name), want.HasField(name)
            if h_set == w_set and (not h_set or getattr(have, name) == getattr(want, name)):
                continue
            if not w_set:
                return None
        pfd = patch_desc.fields_by_name.get(name)
        if pfd is None or not version.knows_field(patch_desc.name, name):
            return None
        value = getattr(want, name)
        if name.startswith("h2_") and value == 0:
            return None
        if name == "http_answers":
            if not have.HasField(name):
                return None
            have_set = {f.name for f, _ in getattr(have, name).ListFields()}
            want_set = {f.name for f, _ in value.ListFields()}
            if not have_set <= want_set:
                return None
            patch.http_answers.CopyFrom(value)
        elif name == "answers":
            if not set(getattr(have, name)) <= set(value) or not all(value.values()):
                return None
            for k, v in value.items():
                patch.answers[k] = v
        elif name == "alpn_protocols":
            if not value:
                return None
            patch.alpn_protocols.values.extend(value)
        elif fd.is_repeated:
            return None  # no other repeated field is patchable
        elif fd.message_type is not None:
            getattr(patch, name).CopyFrom(value)
        else:
            setattr(patch, name, value)
    assert isinstance(patch, Message)
    return patch
