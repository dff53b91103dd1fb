"""Framing of sozu's command channel: bytes <-> ``pb.Request`` / ``pb.Response`` (docs §2, §10).

1.x/2.x (``ProtobufFraming``): an 8-byte little-endian length that counts itself, then protobuf.
0.15 (``JsonFraming``): sozu's serde JSON followed by one NUL. Both readers cap what they buffer at
``max_frame_bytes`` and turn every bad frame into ``SozuProtocolError`` and every EOF into
``SozuConnectionError``; neither ever hangs on garbage (a declared length is checked before anything
is read).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Protocol

import msgspec
from google.protobuf.message import DecodeError, EncodeError

from sozud import serde
from sozud.errors import SozuConnectionError, SozuProtocolError, SozuUnsupportedError, StateError
from sozud.proto import command_pb2 as pb
from sozud.versions import V0_15_19, SozuVersion

__all__ = ["HEADER_BYTES", "Framing", "JsonFraming", "ProtobufFraming", "make_framing"]

_HEADER = struct.Struct("<Q")
HEADER_BYTES = _HEADER.size  # 8: size_of::<usize>() on every 64-bit sozu build


class Framing(Protocol):
    """Bytes <-> messages for one protocol family; errors name ``socket_path``."""

    family: str
    socket_path: str

    def encode(self, req: pb.Request) -> bytes: ...

    async def read(self, reader: asyncio.StreamReader) -> pb.Response: ...


def _check_response(resp: pb.Response, socket_path: str, what: str) -> pb.Response:
    if not resp.IsInitialized():
        errors: list[str] = []
        check: Callable[[list[str]], bool] = resp.IsInitialized  # type: ignore[assignment]
        check(errors)  # the runtime fills in the paths of the missing fields
        missing = ", ".join(errors) or "?"
        raise SozuProtocolError(f"{what}: response lacks required fields ({missing})", socket_path=socket_path)
    return resp


class ProtobufFraming:
    """sozu 1.x/2.x: u64 little-endian total length (prefix included) + protobuf payload."""

    family = "protobuf"

    def __init__(self, *, socket_path: str, max_frame_bytes: int) -> None:
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes

    def encode(self, req: pb.Request) -> bytes:
        try:
            body = req.SerializeToString(deterministic=True)
        except EncodeError as e:
            raise SozuProtocolError(
                f"{serde.request_kind(req)} cannot be encoded: {e}", socket_path=self.socket_path
            ) from None
        return _HEADER.pack(len(body) + HEADER_BYTES) + body

    def decode_length(self, header: bytes) -> int:
        (length,) = _HEADER.unpack(header)
        if length < HEADER_BYTES:
            raise SozuProtocolError(
                f"frame declares {length} bytes, less than its own {HEADER_BYTES}-byte length prefix",
                socket_path=self.socket_path,
            )
        if length > self.max_frame_bytes:
            raise SozuProtocolError(
                f"frame declares {length} bytes, more than max_frame_bytes={self.max_frame_bytes}",
                socket_path=self.socket_path,
            )
        return int(length)

    def decode_payload(self, payload: bytes) -> pb.Response:
        resp = pb.Response()
        try:
            resp.ParseFromString(payload)
        except DecodeError as e:
            raise SozuProtocolError(
                f"undecodable protobuf Response ({len(payload)} bytes): {e}", socket_path=self.socket_path
            ) from None
        return _check_response(resp, self.socket_path, "protobuf frame")

    async def read(self, reader: asyncio.StreamReader) -> pb.Response:
        header = await _read_exactly(reader, HEADER_BYTES, self.socket_path, "length prefix")
        length = self.decode_length(header)
        payload = await _read_exactly(reader, length - HEADER_BYTES, self.socket_path, f"{length}-byte frame")
        return self.decode_payload(payload)


class JsonFraming:
    """sozu 0.15: serde JSON (compact) + one NUL, both directions."""

    family = "json"
    _encoder = msgspec.json.Encoder()

    def __init__(self, *, socket_path: str, max_frame_bytes: int, version: SozuVersion = V0_15_19) -> None:
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.version = version

    def encode(self, req: pb.Request) -> bytes:
        try:
            value = serde.to_json(req, self.version)
        except StateError as e:
            raise SozuUnsupportedError(str(e), socket_path=self.socket_path) from None
        return self._encoder.encode(value) + b"\0"

    def decode_chunk(self, chunk: bytes) -> pb.Response:
        """One frame without its NUL."""
        try:
            value = msgspec.json.decode(chunk)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
            raise SozuProtocolError(
                f"undecodable JSON frame ({len(chunk)} bytes): {e}", socket_path=self.socket_path
            ) from None
        try:
            resp = serde.from_json(pb.Response, value, self.version, source="JSON frame")
        except StateError as e:
            raise SozuProtocolError(f"not a Response: {e}", socket_path=self.socket_path) from None
        return _check_response(resp, self.socket_path, "JSON frame")

    async def read(self, reader: asyncio.StreamReader) -> pb.Response:
        try:
            chunk = await reader.readuntil(b"\0")
        except asyncio.LimitOverrunError:
            raise SozuProtocolError(
                f"JSON frame longer than max_frame_bytes={self.max_frame_bytes} (no NUL terminator)",
                socket_path=self.socket_path,
            ) from None
        except asyncio.IncompleteReadError as e:
            raise _eof(self.socket_path, len(e.partial), None, "JSON frame") from None
        except OSError as e:
            raise SozuConnectionError(f"read failed: {e}", socket_path=self.socket_path) from None
        if len(chunk) > self.max_frame_bytes:
            raise SozuProtocolError(
                f"JSON frame of {len(chunk)} bytes, more than max_frame_bytes={self.max_frame_bytes}",
                socket_path=self.socket_path,
            )
        return self.decode_chunk(chunk[:-1])


def _eof(socket_path: str, got: int, expected: int | None, what: str) -> SozuConnectionError:
    if got == 0:
        return SozuConnectionError("connection closed by sozu", socket_path=socket_path)
    of = f" of {expected}" if expected is not None else ""
    return SozuConnectionError(
        f"connection closed in the middle of a {what} ({got}{of} bytes received)", socket_path=socket_path
    )


async def _read_exactly(reader: asyncio.StreamReader, n: int, socket_path: str, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise _eof(socket_path, len(e.partial), n, what) from None
    except OSError as e:
        raise SozuConnectionError(f"read failed: {e}", socket_path=socket_path) from None


def make_framing(version: SozuVersion, *, socket_path: str, max_frame_bytes: int) -> Framing:
    if version.json_socket:
        return JsonFraming(socket_path=socket_path, max_frame_bytes=max_frame_bytes, version=version)
    return ProtobufFraming(socket_path=socket_path, max_frame_bytes=max_frame_bytes)
