"""The planner's steps, in the order of :mod:`sozud.state.plan` (make before break), each replayed on a
working copy of live with sozu's main-state rules as it is emitted; the requests it is made of
(removals, activations, certificate replacement) and the 2.x listener patches (what a listener change
can be sent as ``update_*_listener`` instead of a rebuild).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message

from sozud import serde
from sozud.errors import StateError
from sozud.proto import command_pb2 as pb
from sozud.state.model import (
    FRONTEND_KIND_OF_LISTENER,
    LISTENER_TYPES,
    LISTENER_UPDATE_REQUEST,
    ConfigState,
    ObjKey,
    add_request,
    apply_request,
    decode_value,
    describe,
    object_address,
)
from sozud.state.plan_result import PlanStep
from sozud.versions import SozuVersion

__all__ = ["StepBuilder"]

_LISTENER_ORDER = {"http": 0, "https": 1, "tcp": 2, "udp": 3}
_PATCH_SKIP = frozenset({"address", "active"})


def _listener_sort(key: ObjKey, value: Message) -> tuple[Any, ...]:
    return (_LISTENER_ORDER.get(key[1], 9), serde.address_sort_key(getattr(value, "address")))  # noqa: B009


class StepBuilder:
    """Builds the steps while replaying them on a working copy of live (``self.work``)."""

    def __init__(self, live: ConfigState, desired: ConfigState) -> None:
        self.version = live.version
        self.work = ConfigState.from_raw(live.version, dict(live.raw_map()))
        self.desired = desired.raw_map()  # key -> canonical bytes: compared as bytes, decoded to be sent
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

    def keys(self, kind: str, where: Mapping[ObjKey, bytes]) -> list[ObjKey]:
        return sorted(k for k in where if k[0] == kind)

    # -- phases

    def run(self) -> None:
        """Emit every phase in order; ``self.work`` then holds what the steps make of live."""
        deactivate_later: list[ObjKey] = []
        self.new_listeners()
        self.changed_listeners(deactivate_later)
        self.upserts("cluster")
        self.certificates()
        self.upserts("backend")
        self.upserts("http_frontend", remove_first=True)
        self.upserts("https_frontend", remove_first=True)
        self.l4_frontends("tcp_frontend")
        self.l4_frontends("udp_frontend")
        self.removals(deactivate_later)

    def new_listeners(self) -> None:
        items = [(k, decode_value(k, v)) for k, v in self.desired.items() if k[0] == "listener" and k not in self.work]
        for key, value in sorted(items, key=lambda kv: _listener_sort(*kv)):
            self.emit(add_request(key, value), "add", key)
            if getattr(value, "active"):  # noqa: B009
                self.emit(_activation(key, value, True), "activate", key)

    def changed_listeners(self, deactivate_later: list[ObjKey]) -> None:
        work = self.work.raw_map()
        items = [(k, decode_value(k, v)) for k, v in self.desired.items() if k[0] == "listener" and work.get(k, v) != v]
        for key, want in sorted(items, key=lambda kv: _listener_sort(*kv)):
            have = self.work[key]
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
        fronts = [k for k in self.work if k[0] == fkind and object_address(k) == addr]
        if fkind in ("http_frontend", "https_frontend"):
            for k in sorted(fronts):
                self.emit(_remove_frontend(k, self.work[k]), "remove", k, note)
        else:
            for cluster in sorted({k[1] for k in fronts}):
                group = sorted(k for k in fronts if k[1] == cluster)
                self.emit(_remove_frontend(group[0], self.work[group[0]]), "remove", group[0], note)
        if key[1] == "https":
            for k in sorted(k for k in self.work if k[0] == "certificate" and k[1] == addr):
                self.emit(_remove_certificate(k, self.work[k]), "remove", k, note)
        if getattr(have, "active"):  # noqa: B009
            self.emit(_activation(key, have, False), "deactivate", key, note)
        self.emit(_remove_listener(key, have), "remove", key, note)
        self.emit(add_request(key, want), "add", key, note)
        if getattr(want, "active"):  # noqa: B009
            self.emit(_activation(key, want, True), "activate", key, note)

    def upserts(self, kind: str, *, remove_first: bool = False) -> None:
        """New objects of ``kind`` are added; changed ones are sent again (an upsert) or, ``remove_first``
        (HTTP/HTTPS frontends: what changes is not part of sozu's route key), removed with their stored
        values then added."""
        work = self.work.raw_map()  # the working copy's own mapping (never shared): emit() writes to it
        for key in self.keys(kind, self.desired):
            want = self.desired[key]
            have = work.get(key)
            if have is None:
                self.emit(add_request(key, want), "add", key)
            elif have != want and not remove_first:
                self.emit(add_request(key, want), "update", key)
            elif have != want:
                self.emit(_remove_frontend(key, decode_value(key, have)), "remove", key, "changed: remove then add")
                self.emit(add_request(key, want), "add", key, "changed")

    def certificates(self) -> None:
        work, desired = self.work.raw_map(), self.desired
        to_add = [k for k in self.keys("certificate", desired) if k not in work]
        to_remove = [k for k in self.keys("certificate", work) if k not in desired]
        # renewals: same address and names, new fingerprint -> one replace_certificate
        olds: dict[tuple[str, tuple[str, ...]], list[ObjKey]] = {}
        for k in to_remove:
            olds.setdefault((k[1], _names(decode_value(k, work[k]))), []).append(k)
        for k in to_add:
            want = decode_value(k, desired[k])
            group = olds.get((k[1], _names(want)))
            if group:
                old = group.pop(0)
                self.emit(_replace_certificate(k, want, old[2]), "replace", k, f"renews sha256:{old[2][:16]}")
            else:
                self.emit(add_request(k, desired[k]), "add", k)
        for k in self.keys("certificate", desired):
            if k in work and work[k] != desired[k]:
                want = decode_value(k, desired[k])
                self.emit(_replace_certificate(k, want, k[2]), "replace", k, "same fingerprint, new metadata")

    def l4_frontends(self, kind: str) -> None:
        work, desired = self.work.raw_map(), self.desired
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
                self.emit(
                    _remove_frontend(doomed, self.work[doomed]), "remove", doomed, "clears its (cluster, address)"
                )
                for k in want:  # desired insertion order
                    note = "" if k not in have else "kept: re-added after the group's removal"
                    self.emit(add_request(k, desired[k]), "add", k, note)
            elif not going:
                for k in want:
                    if k not in work:
                        self.emit(add_request(k, desired[k]), "add", k)
            # going and not want: a pure removal, done in the removal phase

    def removals(self, deactivate_later: list[ObjKey]) -> None:
        work, desired = self.work.raw_map(), self.desired
        for kind in ("http_frontend", "https_frontend"):
            for k in [k for k in self.keys(kind, work) if k not in desired]:
                self.emit(_remove_frontend(k, self.work[k]), "remove", k)
        for kind in ("tcp_frontend", "udp_frontend"):
            seen: set[tuple[str, str]] = set()
            for k in [k for k in self.keys(kind, work) if k not in desired]:
                if (k[1], k[2]) not in seen:
                    seen.add((k[1], k[2]))
                    self.emit(_remove_frontend(k, self.work[k]), "remove", k)
        readd: set[ObjKey] = set()
        by_address: dict[tuple[str, str], list[ObjKey]] = {}
        for k in work:
            if k[0] == "backend" and k in desired:
                by_address.setdefault((k[1], k[3]), []).append(k)
        for k in [k for k in self.keys("backend", work) if k not in desired]:
            self.emit(_remove_backend(k, self.work[k]), "remove", k)
            readd.update(by_address.get((k[1], k[3]), ()))
        for k in sorted(readd):
            if k in work:
                self.emit(add_request(k, desired[k]), "add", k, "re-added: workers remove backends by address")
        for k in [k for k in self.keys("certificate", work) if k not in desired]:
            self.emit(_remove_certificate(k, self.work[k]), "remove", k)
        for k in [k for k in self.keys("cluster", work) if k not in desired]:
            req = pb.Request()
            req.remove_cluster = k[1]
            self.emit(req, "remove", k)
        gone = [(k, decode_value(k, v)) for k, v in work.items() if k[0] == "listener" and k not in desired]
        for k, v in sorted(gone, key=lambda kv: _listener_sort(*kv)):
            if getattr(v, "active"):  # noqa: B009
                self.emit(_activation(k, v, False), "deactivate", k)
            self.emit(_remove_listener(k, v), "remove", k)
        for k in deactivate_later:
            self.emit(_activation(k, self.work[k], False), "deactivate", k)


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
