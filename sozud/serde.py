"""sozu's serde JSON shape <-> our protobuf messages, for a given sozu version.

sozu derives serde on its prost types, and that JSON is both its 0.15 socket format and the state-file
format of every version (docs/sozu-command-protocol.md §6.2):

- a message is an object whose keys are the field names, in *declaration* order;
- an unset optional field is ``null``; required fields are always present (at their default if unset);
- repeated fields are arrays, maps are objects with sorted keys, enums are integers, bytes are arrays of
  integers, 64-bit integers are plain numbers;
- a oneof is ``"<oneof name>": {"<FIELD NAME UPPER CASE>": value}`` (``null`` when unset), written last;
- ``SocketAddress`` is ``{"ip":{"inner":{"V4":u32}},"port":n}`` from 1.0 on and ``"ip:port"`` in 0.15.

Inside sozud every address is a ``SocketAddress`` message whatever the version; the 0.15 string form
exists only at this edge. The converter walks the message descriptors of our schema and asks
``SozuVersion.knows_field`` which fields a version has, so one table drives both directions.

Reading is strict where sozu is strict (missing required fields, unknown oneof variants) and stricter
where sozu would silently lose data: a key that our schema does not know is an error (naming its path),
never dropped. Writing refuses a field that is set but unknown to the target version.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from sozud.errors import StateError, StateParseError
from sozud.proto import command_pb2 as pb
from sozud.versions import FIELDS_0_15_ONLY, SERDE_DEFAULT_FIELDS, Family, SozuVersion

M = TypeVar("M", bound=Message)
# Field descriptors come from the C (upb) runtime, whose class the stubs do not name: typed loosely here.
_FD = Any

_T = FieldDescriptor
_INT_TYPES = {
    _T.TYPE_INT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _T.TYPE_UINT32: (0, 2**32 - 1),
    _T.TYPE_FIXED32: (0, 2**32 - 1),
    _T.TYPE_INT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _T.TYPE_UINT64: (0, 2**64 - 1),
    _T.TYPE_FIXED64: (0, 2**64 - 1),
}
_SOCKET_ADDRESS = pb.SocketAddress.DESCRIPTOR.full_name


# --- addresses -------------------------------------------------------------------------------------


def address_text(addr: pb.SocketAddress) -> str:
    """Rust ``SocketAddr`` display: ``127.0.0.1:8080``, ``[::1]:443`` (used in keys and 0.15 JSON)."""
    inner = addr.ip.WhichOneof("inner")
    port = addr.port & 0xFFFF
    if inner == "v6":
        n = (addr.ip.v6.high << 64) | addr.ip.v6.low
        return f"[{ipaddress.IPv6Address(n)}]:{port}"
    n = addr.ip.v4 & 0xFFFFFFFF if inner == "v4" else 0
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:{port}"


def parse_address(text: str) -> pb.SocketAddress:
    """``"ip:port"`` or ``"[ipv6]:port"`` to a ``SocketAddress``; ``ValueError`` when it is not one."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or int(port_s) > 65535:
        raise ValueError(f"{text!r} is not an ip:port socket address")
    if host.startswith("[") and host.endswith("]"):
        ip6 = ipaddress.IPv6Address(host[1:-1])
        n = int(ip6)
        return pb.SocketAddress(ip=pb.IpAddress(v6=pb.Uint128(low=n & (2**64 - 1), high=n >> 64)), port=int(port_s))
    ip4 = ipaddress.IPv4Address(host)
    return pb.SocketAddress(ip=pb.IpAddress(v4=int(ip4)), port=int(port_s))


def address_sort_key(addr: pb.SocketAddress) -> tuple[int, int, int]:
    """sozu's listener order: IPv4 before IPv6, then address, then port."""
    if addr.ip.WhichOneof("inner") == "v6":
        return (1, (addr.ip.v6.high << 64) | addr.ip.v6.low, addr.port)
    return (0, addr.ip.v4, addr.port)


# --- field plans -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    name: str
    fd: _FD
    known: bool  # known to the version of the plan
    required: bool
    default_ok: bool  # may be missing on read (serde default)


@cache
def _plan(desc: Any, version: SozuVersion) -> tuple[tuple[_Field, ...], tuple[str, ...]]:
    """Non-oneof fields in declaration order, and the names of the message's real oneofs."""
    fields = []
    oneofs: list[str] = []
    for fd in desc.fields:
        oneof = fd.containing_oneof
        if oneof is not None and not _is_synthetic(oneof):
            if oneof.name not in oneofs:
                oneofs.append(oneof.name)
            continue
        key = (desc.name, fd.name)
        fields.append(
            _Field(
                name=fd.name,
                fd=fd,
                known=version.knows_field(desc.name, fd.name),
                # 0.15's inline listener answers are required there (the 1.x schema dropped them).
                required=bool(fd.is_required) or (version.family is Family.V0_15 and key in FIELDS_0_15_ONLY),
                default_ok=version.family is Family.V2 and key in SERDE_DEFAULT_FIELDS,
            )
        )
    return tuple(fields), tuple(oneofs)


@cache
def _variants(desc: Any) -> dict[str, _FD]:
    """Oneof variants by their JSON name: the field name in upper case (``Logging`` -> ``LOGGING``)."""
    return {fd.name.upper(): fd for fd in desc.fields if fd.containing_oneof is not None}


def _is_synthetic(oneof: Any) -> bool:
    return bool(getattr(oneof, "is_synthetic", False))


def _is_map(fd: _FD) -> bool:
    return fd.type == _T.TYPE_MESSAGE and fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _is_repeated(fd: _FD) -> bool:
    return bool(fd.is_repeated)


# --- protobuf -> JSON ---------------------------------------------------------------------------------


def to_json(msg: Message, version: SozuVersion) -> dict[str, Any]:
    """The serde JSON value (a dict, key order as sozu writes it) of ``msg`` for ``version``."""
    out = _msg_to_json(msg, version, msg.DESCRIPTOR.name)
    if not isinstance(out, dict):  # a bare SocketAddress in 0.15 shape is a string
        raise StateError(f"{msg.DESCRIPTOR.name} has no JSON object form for sozu {version}")
    return out


def _msg_to_json(msg: Message, version: SozuVersion, path: str) -> Any:
    desc = msg.DESCRIPTOR
    if desc.full_name == _SOCKET_ADDRESS and version.family is Family.V0_15:
        assert isinstance(msg, pb.SocketAddress)
        return address_text(msg)
    fields, oneofs = _plan(desc, version)
    out: dict[str, Any] = {}
    for f in fields:
        fd = f.fd
        if not f.known:
            if _is_set(msg, fd):
                raise StateError(
                    f"{path}.{f.name} is set but sozu {version} has no such field; refusing to drop it silently"
                )
            continue
        out[f.name] = _field_to_json(msg, fd, f.required, version, f"{path}.{f.name}")
    for oneof in oneofs:
        which = msg.WhichOneof(oneof)
        if which is None:
            out[oneof] = None
            continue
        fd = desc.fields_by_name[which]
        if desc.name == "Request" and not version.knows_request(which):
            raise StateError(f"{path}: request type {which} is unknown to sozu {version}")
        out[oneof] = {which.upper(): _value_to_json(getattr(msg, which), fd, version, f"{path}.{which}")}
    return out


def _is_set(msg: Message, fd: _FD) -> bool:
    if _is_repeated(fd):
        return len(getattr(msg, fd.name)) > 0
    return msg.HasField(fd.name)


def _field_to_json(msg: Message, fd: _FD, required: bool, version: SozuVersion, path: str) -> Any:
    if _is_map(fd):
        entries = getattr(msg, fd.name)
        value_fd = fd.message_type.fields_by_name["value"]
        return {k: _value_to_json(entries[k], value_fd, version, f"{path}[{k}]") for k in sorted(entries)}
    if _is_repeated(fd):
        return [_value_to_json(v, fd, version, f"{path}[{i}]") for i, v in enumerate(getattr(msg, fd.name))]
    if not required and not msg.HasField(fd.name):
        return None
    return _value_to_json(getattr(msg, fd.name), fd, version, path)


def _value_to_json(value: Any, fd: _FD, version: SozuVersion, path: str) -> Any:
    if fd.type == _T.TYPE_MESSAGE:
        return _msg_to_json(value, version, path)
    if fd.type == _T.TYPE_BYTES:
        return list(value)
    return value


# --- JSON -> protobuf ---------------------------------------------------------------------------------


def from_json(
    cls: type[M],
    value: Any,
    version: SozuVersion,
    *,
    source: str = "<json>",
    record: int | None = None,
    path: str | None = None,
) -> M:
    """Parse a serde JSON value into a new ``cls`` message; errors name source, record and field path.

    A value that :func:`_compiled` accepts becomes the message in one constructor call; anything else is
    walked field by field by :func:`_json_into`, which either builds the same message or raises the error
    naming the field (the compiled reader never decides that a value is wrong, only that it is easy).
    """
    if cls.DESCRIPTOR.full_name != _SOCKET_ADDRESS:
        try:
            return cls(**_compiled(cls.DESCRIPTOR, version)(value))
        except (_NotEasy, TypeError, ValueError):
            pass
    msg = cls()
    _json_into(msg, value, version, _Where(source, record), path or cls.DESCRIPTOR.name)
    return msg


# --- JSON -> protobuf, compiled ------------------------------------------------------------------------
#
# The same rules as _json_into, checked by one small function per field, built once per message type and
# version: a value that passes becomes the keyword arguments of the message's constructor (the C runtime
# builds nested messages from nested dicts). Whatever does not pass raises _NotEasy and goes to
# _json_into, whose errors name the field; tests/test_fast_parse.py checks that both give the same message.


class _NotEasy(Exception):
    """The value needs :func:`_json_into` (it is wrong, or unusual)."""


_Conv = Callable[[Any], Any]


@cache
def _compiled(desc: Any, version: SozuVersion) -> _Conv:
    """A function: the serde JSON value of a ``desc`` message -> its constructor's keyword arguments."""
    fields, oneofs = _plan(desc, version)
    # key -> (field name, converter of a non-null value, null allowed)
    plain: dict[str, tuple[str, _Conv, bool]] = {}
    for fd in desc.fields:
        oneof = fd.containing_oneof
        if oneof is not None and not _is_synthetic(oneof):
            continue
        plain[fd.name] = (fd.name, _field_conv(fd, version), not (fd.is_required or _is_repeated(fd)))
    variants: dict[str, dict[str, tuple[str, _Conv]]] = {name: {} for name in oneofs}
    for upper, fd in _variants(desc).items():
        oneof = fd.containing_oneof
        if oneof is not None and oneof.name in variants:
            variants[oneof.name][upper] = (fd.name, _value_conv(fd, version))
    many = [f for f in fields if (_is_repeated(f.fd) or _is_map(f.fd)) and not f.default_ok]
    must = frozenset(f.name for f in fields if f.known and (f.required or f in many))

    def convert(value: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise _NotEasy
        out: dict[str, Any] = {}
        for key, item in value.items():
            entry = plain.get(key)
            if entry is not None:
                if item is None:
                    if entry[2]:
                        continue
                    raise _NotEasy
                out[entry[0]] = entry[1](item)
                continue
            choices = variants.get(key)
            if choices is None:
                raise _NotEasy
            if item is None:
                continue
            if type(item) is not dict or len(item) != 1:
                raise _NotEasy
            ((variant, inner),) = item.items()
            chosen = choices.get(variant)
            if chosen is None:
                raise _NotEasy
            out[chosen[0]] = chosen[1](inner)
        if not must <= value.keys():
            raise _NotEasy
        return out

    return convert


def _field_conv(fd: _FD, version: SozuVersion) -> _Conv:
    if _is_map(fd):
        key_fd = fd.message_type.fields_by_name["key"]
        if key_fd.type != _T.TYPE_STRING:
            return _never  # JSON keys are strings: the walk says what is wrong
        conv = _value_conv(fd.message_type.fields_by_name["value"], version)

        def convert_map(item: Any) -> dict[str, Any]:
            if type(item) is not dict:
                raise _NotEasy
            return {k: conv(v) for k, v in item.items()}

        return convert_map
    if _is_repeated(fd):
        conv = _value_conv(fd, version)

        def convert_list(item: Any) -> list[Any]:
            if type(item) is not list:
                raise _NotEasy
            return [conv(v) for v in item]

        return convert_list
    return _value_conv(fd, version)


def _never(item: Any) -> Any:
    raise _NotEasy


def _value_conv(fd: _FD, version: SozuVersion) -> _Conv:
    """The converter of one value of ``fd`` (one element of a repeated field or map)."""
    t = fd.type
    if t == _T.TYPE_MESSAGE:
        sub = fd.message_type
        if sub.full_name == _SOCKET_ADDRESS and version.family is Family.V0_15:
            return _address_text_conv
        cell: list[_Conv] = []  # resolved on first use: message types may refer to themselves

        def convert_message(item: Any) -> Any:
            if not cell:
                cell.append(_compiled(sub, version))
            return cell[0](item)

        return convert_message
    if t == _T.TYPE_BOOL:
        return _bool_conv
    if t == _T.TYPE_STRING:
        return _str_conv
    if t == _T.TYPE_ENUM:
        numbers = frozenset(v.number for v in fd.enum_type.values)

        def convert_enum(item: Any) -> Any:
            if type(item) is not int or item not in numbers:
                raise _NotEasy
            return item

        return convert_enum
    if t in _INT_TYPES:
        lo, hi = _INT_TYPES[t]

        def convert_int(item: Any) -> Any:
            if type(item) is not int or not lo <= item <= hi:
                raise _NotEasy
            return item

        return convert_int
    return _never  # bytes (none in a stored request) and anything unusual: the walk


def _address_text_conv(item: Any) -> pb.SocketAddress:
    if type(item) is not str:
        raise _NotEasy
    try:
        return parse_address(item)
    except ValueError:
        raise _NotEasy from None


def _bool_conv(item: Any) -> bool:
    if type(item) is not bool:
        raise _NotEasy
    return item


def _str_conv(item: Any) -> str:
    if type(item) is not str:
        raise _NotEasy
    return item


@dataclass(frozen=True)
class _Where:
    source: str
    record: int | None

    def error(self, path: str, reason: str) -> StateParseError:
        return StateParseError(reason, source=self.source, record=self.record, path=path)


def _json_into(msg: Message, value: Any, version: SozuVersion, where: _Where, path: str) -> None:
    desc = msg.DESCRIPTOR
    if desc.full_name == _SOCKET_ADDRESS and isinstance(value, str):
        if version.family is not Family.V0_15:
            raise where.error(
                path,
                f'address {value!r} is a string (sozu 0.15 shape) but sozu {version} uses {{"ip":...,"port":...}}',
            )
        try:
            msg.CopyFrom(parse_address(value))
        except ValueError as e:
            raise where.error(path, str(e)) from None
        return
    if not isinstance(value, dict):
        raise where.error(path, f"expected an object for {desc.name}, got {_kind(value)}")
    if desc.full_name == _SOCKET_ADDRESS and version.family is Family.V0_15:
        raise where.error(path, f'address is an object but sozu {version} writes addresses as "ip:port"')
    fields, oneofs = _plan(desc, version)
    seen: set[str] = set()
    for key, item in value.items():
        sub = f"{path}.{key}"
        if key in oneofs:
            seen.add(key)
            if item is None:
                continue
            if not isinstance(item, dict) or len(item) != 1:
                raise where.error(sub, f'expected {{"VARIANT": value}} for oneof {key}, got {_kind(item)}')
            ((variant, inner),) = item.items()
            fd = _variants(desc).get(variant) if isinstance(variant, str) else None
            if fd is None or fd.containing_oneof is None or fd.containing_oneof.name != key:
                raise where.error(sub, f"unknown {key} variant {variant!r}")
            _set_value(msg, fd, inner, version, where, f"{sub}.{variant}")
            continue
        fd = desc.fields_by_name.get(key)
        if fd is None or (fd.containing_oneof is not None and not _is_synthetic(fd.containing_oneof)):
            raise where.error(sub, f"unknown field {key!r} in {desc.name} (refusing to drop it)")
        seen.add(key)
        if item is None:
            if fd.is_required or _is_repeated(fd):
                raise where.error(sub, "null for a required field")
            continue
        if _is_map(fd):
            _set_map(msg, fd, item, version, where, sub)
        elif _is_repeated(fd):
            if not isinstance(item, list):
                raise where.error(sub, f"expected an array, got {_kind(item)}")
            for i, elem in enumerate(item):
                _append(msg, fd, elem, version, where, f"{sub}[{i}]")
        else:
            _set_value(msg, fd, item, version, where, sub)
    for f in fields:
        if f.name in seen or not f.known:
            continue
        if f.required or ((_is_repeated(f.fd) or _is_map(f.fd)) and not f.default_ok):
            raise where.error(f"{path}.{f.name}", "missing required field")


def _set_map(msg: Message, fd: _FD, item: Any, version: SozuVersion, where: _Where, path: str) -> None:
    if not isinstance(item, dict):
        raise where.error(path, f"expected an object (map), got {_kind(item)}")
    container = getattr(msg, fd.name)
    value_fd = fd.message_type.fields_by_name["value"]
    for k, v in item.items():
        if value_fd.type == _T.TYPE_MESSAGE:
            _json_into(container[k], v, version, where, f"{path}[{k}]")
        else:
            container[k] = _scalar(value_fd, v, where, f"{path}[{k}]")


def _append(msg: Message, fd: _FD, elem: Any, version: SozuVersion, where: _Where, path: str) -> None:
    container = getattr(msg, fd.name)
    if fd.type == _T.TYPE_MESSAGE:
        _json_into(container.add(), elem, version, where, path)
    else:
        container.append(_scalar(fd, elem, where, path))


def _set_value(msg: Message, fd: _FD, item: Any, version: SozuVersion, where: _Where, path: str) -> None:
    if fd.type == _T.TYPE_MESSAGE:
        sub = getattr(msg, fd.name)
        sub.SetInParent()
        _json_into(sub, item, version, where, path)
    else:
        setattr(msg, fd.name, _scalar(fd, item, where, path))


def _scalar(fd: _FD, item: Any, where: _Where, path: str) -> Any:
    t = fd.type
    if t == _T.TYPE_BOOL:
        if not isinstance(item, bool):
            raise where.error(path, f"expected a boolean, got {_kind(item)}")
        return item
    if t == _T.TYPE_STRING:
        if not isinstance(item, str):
            raise where.error(path, f"expected a string, got {_kind(item)}")
        return item
    if t == _T.TYPE_BYTES:
        if not isinstance(item, list) or not all(isinstance(b, int) and 0 <= b <= 255 for b in item):
            raise where.error(path, "expected an array of byte values")
        return bytes(item)
    if t == _T.TYPE_ENUM:
        if not isinstance(item, int) or isinstance(item, bool):
            raise where.error(path, f"expected an enum number, got {_kind(item)}")
        # (the runtime's table of values truncates a number to 32 bits before looking it up)
        if not -(2**31) <= item < 2**31 or fd.enum_type.values_by_number.get(item) is None:
            raise where.error(path, f"{item} is not a known {fd.enum_type.name} value")
        return item
    if t in _INT_TYPES:
        lo, hi = _INT_TYPES[t]
        if not isinstance(item, int) or isinstance(item, bool) or not lo <= item <= hi:
            raise where.error(path, f"expected an integer in [{lo}, {hi}], got {_kind(item)}")
        return item
    raise where.error(path, f"unsupported field type {t}")  # no float/double in the schema


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# --- helpers used by callers ---------------------------------------------------------------------------


def request_kind(req: pb.Request) -> str:
    """The ``request_type`` oneof field name (``"add_cluster"``), or ``"empty"``."""
    return req.WhichOneof("request_type") or "empty"
