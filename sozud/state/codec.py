"""sozu state files <-> :class:`ConfigState` (docs/sozu-command-protocol.md §3.8, §6, §11.11).

Reading (:func:`parse_state_file`)
    A state file is a sequence of records, each the compact JSON of a ``WorkerRequest``
    (``{"id": ..., "content": {"request_type": {...}}}``) followed by ``0x00``; sozu writes ``\\n\\0``
    and the ``\\n`` is JSON whitespace. The final ``0x00`` is mandatory and nothing may follow it.
    Records are applied in order with sozu's main-state semantics (:func:`model.apply_request`):
    ``ADD_*`` put objects (clusters and backends upsert, an already-present certificate is a no-op),
    ``ACTIVATE_LISTENER`` / ``DEACTIVATE_LISTENER`` set or clear ``active``, ``REMOVE_*``,
    ``REPLACE_CERTIFICATE``, ``UPDATE_*_LISTENER`` and the 2.x health-check requests are applied too
    (``load_state`` accepts them, §11.10).

    Policy: the reader is strict. Every problem is a :class:`~sozud.errors.StateParseError` naming
    the source, the record number (0-based, the ``n`` of sozu's ``SAVE-n`` ids) and the field path:
    invalid UTF-8 or JSON, a truncated last record, bytes after the last NUL, an empty file (unless
    ``allow_empty``), a JSON key or oneof variant our schema does not know (rejected, never dropped:
    sozu itself would ignore unknown keys and lose the data silently), a query or runtime-only
    request (``status``, ``Logging``, ...), and a record that sozu's main state would refuse
    (duplicate listener or frontend, removal of a missing object): ``load_state`` skips those
    silently, sozud refuses the file instead.

    Completeness: sozu rewrites its file in place, and a file cut exactly at a record boundary parses.
    The bytes alone cannot tell; the writer of a shared state stores, beside it, the record count
    (:func:`record_count`) and the semantic digest (:meth:`ConfigState.digest`); pass them as
    ``expect_records`` / ``expect_digest`` and a mismatch is a :class:`StateParseError`.

Writing (:func:`write_state_file`)
    Exactly what that sozu version's ``save_state`` writes (§6.3): HTTP, HTTPS, TCP, (2.1) UDP
    listeners sorted by address, each followed by ``ACTIVATE_LISTENER`` when active; clusters by id;
    HTTP frontends by route key; certificates; HTTPS frontends by route key; TCP (then UDP)
    frontends; backends by cluster id then (backend_id, sticky_id, weight, backup, address). Ids are
    ``SAVE-n``; ``expired_at`` is always ``null``. sozu's own order of certificates and of TCP/UDP
    frontends depends on hash-map iteration and varies between saves; here certificates are sorted
    by (listener address, fingerprint), and TCP/UDP frontends by cluster id, keeping the order in
    which a cluster's frontends entered the state (sozu keeps them in a list in insertion order).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from typing import Any

import msgspec
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from sozud import serde
from sozud.errors import StateError, StateParseError, VersionMismatchError
from sozud.proto import command_pb2 as pb
from sozud.state.model import (
    LISTENER_TYPES,
    ConfigState,
    ObjKey,
    add_request,
    add_request_field,
    apply_request,
    decode_value,
)
from sozud.state.records import RecordCache, Seen, body_digest, seen_after
from sozud.versions import STORED_REQUESTS, V0_15_19, V1_1_1, V2_1_0, Family, SozuVersion

__all__ = [
    "RecordCache",
    "detect_family",
    "detect_version",
    "file_digest",
    "iter_records",
    "parse_state_file",
    "record_count",
    "state_requests",
    "write_state_file",
]

# Requests a state file may hold: the ones sozu's main state stores.

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()

# Limits on what a state file may hold (docs: README "Limits"). sozu's own load_state (and its saved_state
# at start-up) reads records through a 200 000-byte buffer: a longer record could never be loaded back, and
# a frontend that large makes sozu's query answers approach the 2 MB frame cap. Checked before decoding, so
# a hostile file costs no more than reading it.
MAX_RECORD_BYTES = 190_000
MAX_STATE_BYTES = 256 * 1024 * 1024


# --- reading ------------------------------------------------------------------------------------------


def iter_records(data: bytes, *, source: str) -> Iterator[tuple[int, bytes]]:
    """Split ``data`` into (record number, record bytes); errors for a missing final NUL."""
    parts = data.split(b"\0")
    tail = parts.pop()  # after the last NUL: must be empty
    if tail:
        raise StateParseError(
            f"truncated last record: {len(tail)} bytes without the terminating NUL (a partly written file?)",
            source=source,
            record=len(parts),
        )
    return iter(enumerate(parts))


def _decode(raw: bytes, source: str, n: int) -> Any:
    try:
        return _DECODER.decode(raw)
    except UnicodeDecodeError as e:
        raise StateParseError(f"invalid UTF-8 in a JSON string ({e.reason})", source=source, record=n) from None
    except RecursionError:
        raise StateParseError(
            "JSON nested too deeply (no sozu record nests more than a few levels)", source=source, record=n
        ) from None
    except msgspec.DecodeError as e:
        reason = str(e)
        if not raw.strip():
            reason = "empty record (two NULs in a row, or a stray NUL)"
        raise StateParseError(f"not a JSON record: {reason}", source=source, record=n) from None


def parse_state_file(
    data: bytes,
    version: SozuVersion | None = None,
    *,
    source: str,
    expect_records: int | None = None,
    expect_digest: str | None = None,
    allow_empty: bool = False,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
    max_state_bytes: int | None = MAX_STATE_BYTES,
    cache: RecordCache | None = None,
) -> ConfigState:
    """Parse a sozu state file into a :class:`ConfigState` (see the module docstring for the rules).

    ``version=None`` detects the family from the content (:func:`detect_version`); an explicit
    version that the content contradicts raises :class:`VersionMismatchError`. ``source`` names the
    file or key in every error. ``expect_records`` / ``expect_digest`` (record count and
    :meth:`ConfigState.digest` published by the writer) turn a truncated-at-a-boundary or altered
    file into a :class:`StateParseError`. An empty file is an error unless ``allow_empty`` (it is what
    a reader sees while sozu rewrites its file); with ``allow_empty`` and no version, 2.1.0 is assumed.
    ``max_record_bytes`` / ``max_state_bytes`` (None: no limit, for what sozu itself saved) refuse a file
    holding a record sozu could not load back, or too large a file, before anything is decoded.
    ``cache`` (with an explicit ``version``): records whose bytes the cache's last parse saw are not
    decoded again (:class:`RecordCache`); the result is the same.
    """
    if max_state_bytes is not None and len(data) > max_state_bytes:
        raise StateParseError(
            f"state of {len(data)} bytes, more than the {max_state_bytes}-byte limit on a state file", source=source
        )
    if not data:
        if not allow_empty:
            raise StateParseError("empty state file (0 bytes) where records are expected", source=source)
        state = ConfigState(version or V2_1_0)
        _check_expectations(state, 0, source, expect_records, expect_digest)
        return state
    # each record's length (the pieces of the split are freed at once: the records are cut again one by one)
    lengths = [len(raw) for _, raw in iter_records(data, source=source)]
    if max_record_bytes is not None:
        for n, length in enumerate(lengths):
            if length > max_record_bytes:
                raise StateParseError(
                    f"record of {length} bytes, more than {max_record_bytes}: sozu reads state files through a "
                    "200,000-byte buffer and could never load it back (a frontend with a huge tag map or name?)",
                    source=source,
                    record=n,
                )
    if version is not None:
        try:
            state, parsed, decoded = _parse_streaming(_cut(data, lengths), version, source, cache)
        except Exception:  # the reference parse below raises the error, worded as always
            pass
        else:
            _check_expectations(state, len(lengths), source, expect_records, expect_digest)
            if cache is not None:
                cache._parsed = parsed
                cache.decoded += decoded
            return state
    return _parse_reference(
        list(iter_records(data, source=source)), version, source, cache, expect_records, expect_digest
    )


def _cut(data: bytes, lengths: list[int]) -> Iterator[tuple[int, bytes]]:
    """(record number, record bytes), one record at a time, from the records' lengths."""
    start = 0
    for n, length in enumerate(lengths):
        yield n, data[start : start + length]
        start += length + 1


def _parse_reference(
    raws: list[tuple[int, bytes]],
    version: SozuVersion | None,
    source: str,
    cache: RecordCache | None,
    expect_records: int | None,
    expect_digest: str | None,
) -> ConfigState:
    """The parse whose errors are the reference: every record decoded, then the version checked against
    all of them, then the records applied in order. Holds every record's JSON value at once."""
    if version is None:
        cache = None  # records are kept per version: a parse that must detect it keeps none
    seen_of: Callable[[bytes], Seen | None] | None = None
    if cache is not None and version is not None:
        cache._for(version)
        seen_of = cache.lookup()
    bodies = [body_digest(raw) for _, raw in raws] if cache is not None else []
    # each record's JSON value to decode, or None when the cache's last parse saw it (``reused``)
    values: list[Any] = []
    reused: dict[int, Seen] = {}
    for n, raw in raws:
        seen = seen_of(bodies[n]) if seen_of is not None else None
        if seen is not None:
            reused[n] = seen
            values.append(None)
        else:
            values.append(_decode(raw, source, n))
    if version is None:
        version = detect_version(values, source=source)
    else:
        _check_compatible(version, [v for v in values if v is not None], source)
    state, parsed = _build_state(
        version,
        ((n, bodies[n] if bodies else b"", reused.get(n), values[n]) for n in range(len(values))),
        source,
        cached=cache is not None,
    )
    _check_expectations(state, len(values), source, expect_records, expect_digest)
    if cache is not None:
        cache._parsed = parsed
        cache.decoded += len(values) - len(reused)
    return state


class _Mismatch(Exception):
    """The file's shape contradicts the version (the reference parse words the error)."""


def _parse_streaming(
    raws: Iterable[tuple[int, bytes]], version: SozuVersion, source: str, cache: RecordCache | None
) -> tuple[ConfigState, dict[bytes, Seen], int]:
    """The usual case, fast and small: each record decoded, applied and dropped in turn, so that no more
    than one record's JSON value is alive at a time (a heap of them costs memory, and keeps the garbage
    collector busy). Raises at the first problem of any kind; the caller then runs
    :func:`_parse_reference`, whose errors are the ones to report. Returns the state, what the cache
    keeps, and how many records were decoded."""
    seen_of: Callable[[bytes], Seen | None] | None = None
    if cache is not None:
        cache._for(version)
        seen_of = cache.lookup()
    decoded = 0
    strings: bool | None = None  # the first address's shape: a string (0.15) or an object
    v2 = False
    check_v2 = version.family is Family.V1

    def records() -> Iterator[tuple[int, bytes, Seen | None, Any]]:
        nonlocal decoded, strings, v2
        for n, raw in raws:
            body = body_digest(raw) if seen_of is not None else b""
            seen = seen_of(body) if seen_of is not None else None
            if seen is not None:
                yield n, body, seen, None
                continue
            value = _decode(raw, source, n)
            decoded += 1
            if strings is None:
                strings = _string_addresses([value])
            if check_v2 and not v2:
                v2 = _has_v2_key(value, pb.WorkerRequest.DESCRIPTOR)
            yield n, body, None, value

    state, parsed = _build_state(version, records(), source, cached=cache is not None)
    if (strings is not None and (version.family is Family.V0_15) != strings) or v2:
        raise _Mismatch
    return state, parsed, decoded


def _build_state(
    version: SozuVersion,
    records: Iterable[tuple[int, bytes, Seen | None, Any]],
    source: str,
    *,
    cached: bool,
) -> tuple[ConfigState, dict[bytes, Seen]]:
    """Apply every record in order, as sozu's main state would. ``records`` gives, for each, its number,
    its body digest (when ``cached``), what a cache saw of it (or None) and its decoded JSON value (None when
    the cache saw it): an object is added again by its key when that is all the record did. Returns the
    state and, when ``cached``, what the cache keeps of each record."""
    state = ConfigState(version)
    parsed: dict[bytes, Seen] = {}
    for n, body, seen, value in records:
        if seen is not None and seen.key is not None and seen.raw is not None:
            if seen.key not in state:
                state.put_raw(seen.key, seen.raw)  # what applying it added before
                parsed[body] = seen
                continue
            req = add_request(seen.key, seen.raw)  # an object added twice: applying it tells what sozu does
        elif seen is not None:
            req = pb.Request.FromString(seen.request)
        else:
            req = _record_request(value, version, source, n)
        kind = req.WhichOneof("request_type") or ""
        size = len(state)
        try:
            apply_request(state, req)
        except StateError as e:
            raise StateParseError(
                f"sozu's main state would refuse {kind.upper()}: {e}",
                source=source,
                record=n,
                path=f"content.request_type.{kind.upper()}",
            ) from None
        if cached:
            parsed[body] = seen_after(req, kind, state, added=state.newest() if len(state) == size + 1 else None)
    return state, parsed


def _record_request(value: Any, version: SozuVersion, source: str, n: int) -> pb.Request:
    """The configuration request of one decoded record, checked for what a state file may hold."""
    if not isinstance(value, dict):
        raise StateParseError("a record must be a JSON object", source=source, record=n)
    record = serde.from_json(pb.WorkerRequest, value, version, source=source, record=n)
    req = record.content
    kind = req.WhichOneof("request_type")
    if kind is None:
        raise StateParseError("record has no request", source=source, record=n, path="content.request_type")
    if kind not in STORED_REQUESTS:
        raise StateParseError(
            f"{kind.upper()} is not a configuration request (a query or a runtime-only request); "
            "a state file cannot hold it",
            source=source,
            record=n,
            path="content.request_type",
        )
    if not version.knows_request(kind):
        raise VersionMismatchError(f"{source}, record {n}: {kind.upper()} does not exist in sozu {version}")
    return req


def _check_expectations(
    state: ConfigState, records: int, source: str, expect_records: int | None, expect_digest: str | None
) -> None:
    if expect_records is not None and records != expect_records:
        raise StateParseError(
            f"incomplete or altered state: {records} records, the writer published {expect_records}",
            source=source,
        )
    if expect_digest is not None and state.digest() != expect_digest:
        raise StateParseError(
            f"incomplete or altered state: digest {state.digest()[:16]}... differs from the published "
            f"{expect_digest[:16]}...",
            source=source,
        )


# --- version detection -----------------------------------------------------------------------------------


def detect_family(data: bytes, *, source: str = "<state>") -> Family:
    """The sozu family a state file was written by (0.15: string addresses; 2.x: any 2.x-only key)."""
    if not data:
        raise StateParseError("cannot detect the sozu family of an empty state file", source=source)
    values = [_decode(raw, source, n) for n, raw in iter_records(data, source=source)]
    return detect_version(values, source=source).family


def detect_version(values: list[Any], *, source: str = "<state>") -> SozuVersion:
    """0.15.19 if addresses are strings, 2.1.0 if any key or request type is 2.x-only, else 1.1.1.

    A file without any address (only clusters and their removals) has the same shape in 0.15 and
    1.x: it is read as 1.1.1 unless a version is given.
    """
    if _string_addresses(values):
        return V0_15_19
    if _any_v2_key(values):
        return V2_1_0
    return V1_1_1


def _string_addresses(values: list[Any]) -> bool | None:
    """Whether the first record that carries an ``address`` has it as a string (the 0.15 shape);
    None when no record carries one (clusters only: the families' shapes are then the same)."""
    for value in values:
        try:
            ((_, inner),) = value["content"]["request_type"].items()
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if isinstance(inner, dict) and "address" in inner:
            return isinstance(inner["address"], str)
    return None


def _any_v2_key(values: list[Any]) -> bool:
    return any(_has_v2_key(value, pb.WorkerRequest.DESCRIPTOR) for value in values)


@cache
def _v1_fields(desc: Descriptor) -> frozenset[str]:
    return frozenset(fd.name for fd in desc.fields if V1_1_1.knows_field(desc.name, fd.name))


def _has_v2_key(value: Any, desc: Descriptor) -> bool:
    if not isinstance(value, dict):
        return False
    known = _v1_fields(desc)
    oneofs = {o.name for o in desc.oneofs}
    for key, item in value.items():
        if key in oneofs:
            if isinstance(item, dict):
                for variant, inner in item.items():
                    fd = desc.fields_by_name.get(variant.lower()) if isinstance(variant, str) else None
                    if fd is None:
                        continue  # unknown variant: the real parse reports it
                    if desc.name == "Request" and not V1_1_1.knows_request(fd.name):
                        return True
                    if fd.message_type is not None and _has_v2_key(inner, fd.message_type):
                        return True
            continue
        fd = desc.fields_by_name.get(key)
        if fd is None:
            continue  # unknown: the real parse reports it
        if key not in known:
            return True
        if fd.message_type is None or item is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if (
                value_fd.message_type is not None
                and isinstance(item, dict)
                and any(_has_v2_key(v, value_fd.message_type) for v in item.values())
            ):
                return True
        elif isinstance(item, list):
            if any(_has_v2_key(v, fd.message_type) for v in item):
                return True
        elif _has_v2_key(item, fd.message_type):
            return True
    return False


def _check_compatible(version: SozuVersion, values: list[Any], source: str) -> None:
    strings = _string_addresses(values)
    if strings is not None and (version.family is Family.V0_15) != strings:
        raise VersionMismatchError(
            f"{source} was written by sozu {'0.15' if strings else '1.x/2.x'} (addresses "
            f"{'as strings' if strings else 'as objects'}) but sozu {version} "
            "was given: the two families' state files are mutually unreadable"
        )
    if version.family is Family.V1 and _any_v2_key(values):
        raise VersionMismatchError(
            f"{source} holds sozu 2.x fields or requests but sozu {version} was given: 1.x would drop "
            "the 2.x settings silently"
        )


# --- writing ------------------------------------------------------------------------------------------


_Record = tuple[ObjKey, bytes] | pb.Request  # an object's add request (key, canonical bytes), or a request


def _save_records(state: ConfigState) -> Iterator[_Record]:
    """The records sozu's ``save_state`` writes for ``state``, in its order (§6.3). Only listeners,
    certificates and backends whose (cluster, backend id) is not unique are decoded (to sort them)."""
    by_kind: dict[str, list[tuple[ObjKey, bytes]]] = {}
    for key, raw in state.raw_items():
        by_kind.setdefault(key[0] if key[0] != "listener" else f"listener:{key[1]}", []).append((key, raw))
    udp_ok = state.version.family is not Family.V0_15 and state.version.knows_request("add_udp_listener")
    for lkind in ("http", "https", "tcp", "udp"):
        listeners = [(k, decode_value(k, raw)) for k, raw in by_kind.get(f"listener:{lkind}", [])]
        if lkind == "udp" and listeners and not udp_ok:
            raise StateError(f"state holds UDP listeners but sozu {state.version} has none")
        if state.version.family is Family.V0_15:
            listeners.sort(key=lambda kv: kv[0][2])
        else:
            listeners.sort(key=lambda kv: serde.address_sort_key(getattr(kv[1], "address")))  # noqa: B009
        for key, value in listeners:
            yield add_request(key, value)
            if getattr(value, "active"):  # noqa: B009
                req = pb.Request()
                req.activate_listener.CopyFrom(
                    pb.ActivateListener(
                        address=getattr(value, "address"),  # noqa: B009
                        proxy=LISTENER_TYPES[lkind],
                        from_scm=False,
                    )
                )
                yield req
    for kind in ("cluster", "http_frontend", "certificate", "https_frontend", "tcp_frontend", "udp_frontend"):
        items = by_kind.get(kind, [])
        if kind != "certificate":
            yield from sorted(items, key=lambda kv: kv[0][1])  # stable: keeps insertion order on ties
            continue
        certificates = [(k, decode_value(k, raw)) for k, raw in items]
        for key, value in sorted(certificates, key=_cert_sort_key):
            req = add_request(key, value)
            req.add_certificate.ClearField("expired_at")
            yield req
    yield from _sorted_backends(by_kind.get("backend", []))


def _sorted_backends(items: list[tuple[ObjKey, bytes]]) -> Iterator[tuple[ObjKey, bytes]]:
    """Backends in :func:`_backend_sort_key` order, decoding only those whose (cluster id, backend id)
    another backend shares (the rest of the sort key tells them apart)."""
    items = sorted(items, key=lambda kv: (kv[0][1], kv[0][2]))  # the key's (cluster_id, backend_id)
    i = 0
    while i < len(items):
        j = i + 1
        while j < len(items) and items[j][0][1:3] == items[i][0][1:3]:
            j += 1
        if j - i == 1:
            yield items[i]
        else:
            group = [(k, decode_value(k, raw), raw) for k, raw in items[i:j]]
            group.sort(key=lambda kvr: _backend_sort_key((kvr[0], kvr[1])))
            yield from ((k, raw) for k, _, raw in group)
        i = j


def state_requests(state: ConfigState) -> list[pb.Request]:
    """The requests sozu's ``save_state`` writes for ``state``, in its record order (§6.3)."""
    return [rec if isinstance(rec, pb.Request) else add_request(*rec) for rec in _save_records(state)]


def _cert_sort_key(kv: tuple[ObjKey, Message]) -> tuple[Any, ...]:
    value = kv[1]
    assert isinstance(value, pb.AddCertificate)
    return (serde.address_sort_key(value.address), kv[0][2])


def _backend_sort_key(kv: tuple[ObjKey, Message]) -> tuple[Any, ...]:
    b = kv[1]
    assert isinstance(b, pb.AddBackend)

    def opt(present: bool, v: Any) -> tuple[Any, ...]:
        return (1, v) if present else (0,)

    return (
        b.cluster_id,
        b.backend_id,
        opt(b.HasField("sticky_id"), b.sticky_id),
        opt(b.HasField("load_balancing_parameters"), b.load_balancing_parameters.weight),
        opt(b.HasField("backup"), b.backup),
        serde.address_sort_key(b.address),
    )


def write_state_file(state: ConfigState, *, cache: RecordCache | None = None) -> bytes:
    """The bytes sozu ``state.version``'s ``save_state`` writes for ``state`` (module docstring).
    ``cache``: requests its last write encoded are not encoded again (:class:`RecordCache`)."""
    version = state.version
    known: dict[str, dict[bytes, bytes]] = {}
    written: dict[str, dict[bytes, bytes]] = {}
    if cache is not None:
        cache._for(version)
        known = cache._written
    out = io.BytesIO()  # getvalue() hands over its buffer: the file is not copied at the end
    write = out.write
    for n, rec in enumerate(_save_records(state)):
        if cache is None:
            req = rec if isinstance(rec, pb.Request) else add_request(*rec)
            record = pb.WorkerRequest(id=f"SAVE-{n}", content=req)
            write(_ENCODER.encode(serde.to_json(record, version)))
        else:
            if isinstance(rec, pb.Request):
                field, value = "", rec.SerializeToString(deterministic=True)
            else:
                field, value = add_request_field(rec[0]), rec[1]
            seen = known.get(field)
            content = seen.get(value) if seen is not None else None
            if content is None:
                req = rec if isinstance(rec, pb.Request) else add_request(*rec)
                content = _ENCODER.encode(serde.to_json(req, version))
                cache.encoded += 1
            written.setdefault(field, {})[value] = content
            write(b'{"id":"SAVE-%d","content":' % n)
            write(content)
            write(b"}")
        write(b"\n\0")
    if cache is not None:
        cache._written = written
    return out.getvalue()


def record_count(state: ConfigState) -> int:
    """How many records :func:`write_state_file` writes for ``state`` (objects + active listeners)."""
    active = sum(1 for k, v in state.of_kind("listener") if getattr(v, "active"))  # noqa: B009
    return len(state) + active


def file_digest(data: bytes) -> str:
    """sha-256 hex of raw state-file bytes (for logs; :meth:`ConfigState.digest` is the semantic one)."""
    return hashlib.sha256(data).hexdigest()
