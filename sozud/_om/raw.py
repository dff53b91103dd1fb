"""v2 raw protocol: one JSON message + ``\\0`` per request, one reply + ``\\0`` (opensvc-api.md §1.2).

``RawUnixTransport`` talks to ``lsnr.sock`` in clear; ``RawTcpTransport`` to port 1214 with every
message wrapped in the AES-256-CBC envelope. One connection per request; the event stream keeps its
own connection and reads ``\\0``-separated events from it. No size limit on values (§3.3).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import socket
import zlib
from abc import abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sozud._om.base import MAX_REPLY_BYTES, describe, request_deadline_s
from sozud._om.v2 import CONNECTED, V2Transport
from sozud.errors import (
    ConfigError,
    OpenSVCAuthError,
    OpenSVCRefusedError,
    OpenSVCUnreachableError,
)

_CHUNK_BYTES = 256 * 1024
_json_encoder = msgspec.json.Encoder()


class _StreamClosed(Exception):
    """Internal: EOF before a frame ended."""


class _FrameTooLarge(Exception):
    """Internal: a frame over MAX_REPLY_BYTES."""


class _FrameReader:
    """Split a byte stream into ``\\0``-terminated frames."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = bytearray()

    async def next_frame(self) -> bytes:
        """The next frame without its ``\\0``; raises _StreamClosed at EOF, _FrameTooLarge."""
        scanned = 0
        while True:
            end = self._buffer.find(b"\0", scanned)
            if end >= 0:
                frame = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return frame
            scanned = len(self._buffer)
            if scanned > MAX_REPLY_BYTES:
                raise _FrameTooLarge(f"message exceeds {MAX_REPLY_BYTES} bytes")
            chunk = await self._reader.read(_CHUNK_BYTES)
            if not chunk:
                state = "in the middle of a message" if self._buffer else "without a reply"
                raise _StreamClosed(f"agent closed the connection {state}")
            self._buffer += chunk


class _RawTransport(V2Transport):
    has_events = True

    def __init__(self, name: str, *, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s

    @abstractmethod
    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection to the agent."""

    @abstractmethod
    def _encode(self, message: dict[str, Any]) -> bytes:
        """The bytes to send for ``message``, terminator included."""

    @abstractmethod
    def _decode(self, frame: bytes, *, obj: str | None, key: str | None) -> Any:
        """The JSON value carried by one received frame."""

    async def call(self, action: str, method: str, options: dict[str, Any], *, obj: str, key: str | None) -> Any:
        payload = self._encode({"action": action, "method": method, "options": options})
        limit_s = request_deadline_s(self.timeout_s)
        try:
            async with asyncio.timeout(limit_s):
                reader, writer = await self._open()
                try:
                    writer.write(payload)
                    await writer.drain()
                    frame = await _FrameReader(reader).next_frame()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            raise OpenSVCUnreachableError(
                f"no reply within {limit_s:g}s", transport=self.name, obj=obj, key=key
            ) from None
        except OSError as exc:
            raise OpenSVCUnreachableError(
                f"cannot talk to the agent: {exc.strerror or exc}", transport=self.name, obj=obj, key=key
            ) from None
        except _StreamClosed as exc:
            raise OpenSVCUnreachableError(str(exc), transport=self.name, obj=obj, key=key) from None
        except _FrameTooLarge as exc:
            raise OpenSVCRefusedError(str(exc), transport=self.name, obj=obj, key=key) from None
        return self._decode(frame, obj=obj, key=key)

    async def event_source(self, obj: str) -> AsyncIterator[Any]:
        payload = self._encode({"action": "events", "method": "GET", "options": {}})
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await self._open()
                writer.write(payload)
                await writer.drain()
        except TimeoutError:
            raise OpenSVCUnreachableError(
                f"event stream not opened within {self.timeout_s}s", transport=self.name, obj=obj
            ) from None
        except OSError as exc:
            raise OpenSVCUnreachableError(
                f"cannot open the event stream: {exc.strerror or exc}", transport=self.name, obj=obj
            ) from None
        try:
            yield CONNECTED
            frames = _FrameReader(reader)
            while True:
                try:
                    frame = await frames.next_frame()
                except OSError as exc:
                    raise OpenSVCUnreachableError(
                        f"event stream lost: {exc.strerror or exc}", transport=self.name, obj=obj
                    ) from None
                except _StreamClosed:
                    raise OpenSVCUnreachableError(
                        "event stream lost: agent closed the connection", transport=self.name, obj=obj
                    ) from None
                except _FrameTooLarge as exc:
                    raise OpenSVCRefusedError(f"event stream: {exc}", transport=self.name, obj=obj) from None
                if frame.strip():
                    yield self._decode(frame, obj=obj, key=None)
        finally:
            writer.close()


def _decode_json(frame: bytes, *, transport: str, obj: str | None, key: str | None) -> Any:
    try:
        return msgspec.json.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise OpenSVCRefusedError(
            f"reply is not JSON: {describe(frame[:200])}", transport=transport, obj=obj, key=key
        ) from None


class RawUnixTransport(_RawTransport):
    """``unix://<path to lsnr.sock>``: clear JSON over the agent's local raw socket."""

    def __init__(self, socket_path: str, *, timeout_s: float = 10.0) -> None:
        super().__init__(f"unix://{socket_path}", timeout_s=timeout_s)
        self.socket_path = socket_path

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(self.socket_path)

    def _encode(self, message: dict[str, Any]) -> bytes:
        return _json_encoder.encode(message) + b"\0"

    def _decode(self, frame: bytes, *, obj: str | None, key: str | None) -> Any:
        return _decode_json(frame, transport=self.name, obj=obj, key=key)


def aes_key(secret: str) -> bytes:
    """The AES key the agent derives from ``cluster.secret``: its first 32 UTF-8 bytes."""
    key = secret.encode("utf-8")[:32]
    if len(key) not in (16, 24, 32):
        raise ConfigError(f"cluster secret is {len(key)} bytes long; AES needs 16, 24 or 32 (32 for AES-256)")
    return key


def seal(message: bytes, *, key: bytes, cluster_name: str, nodename: str, iv: bytes | None = None) -> bytes:
    """The raw-TCP envelope of ``message`` (zlib, PKCS7, AES-CBC, URL-safe base64), ``\\0`` included."""
    iv = os.urandom(16) if iv is None else iv
    padder = padding.PKCS7(128).padder()
    padded = padder.update(zlib.compress(message)) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    envelope = {
        "clustername": cluster_name,
        "nodename": nodename,
        "iv": base64.urlsafe_b64encode(iv).decode("ascii"),
        "data": base64.urlsafe_b64encode(ciphertext).decode("ascii"),
    }
    return _json_encoder.encode(envelope) + b"\0"


class SealError(Exception):
    """Internal: an envelope that is malformed (``ValueError``-like) or does not decrypt."""


def unseal(frame: bytes, *, key: bytes, max_bytes: int = MAX_REPLY_BYTES) -> bytes:
    """The clear message inside one envelope (without its ``\\0``). Raises SealError."""
    try:
        envelope = msgspec.json.decode(frame)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        raise SealError("not a JSON envelope") from None
    if not isinstance(envelope, dict):
        raise SealError("envelope is not a JSON object")
    iv_text, data_text = envelope.get("iv"), envelope.get("data")
    if not isinstance(iv_text, str) or not isinstance(data_text, str):
        raise SealError("envelope lacks iv or data")
    try:
        iv = base64.urlsafe_b64decode(iv_text)
        ciphertext = base64.urlsafe_b64decode(data_text)
    except (binascii.Error, ValueError):
        raise SealError("envelope iv or data is not base64") from None
    if len(iv) != 16 or not ciphertext or len(ciphertext) % 16:
        raise SealError("envelope iv or data has a bad length")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        compressed = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise SealError("does not decrypt (bad padding)") from None
    inflater = zlib.decompressobj()
    try:
        message = inflater.decompress(compressed, max_bytes)
    except zlib.error:
        raise SealError("does not decrypt (not zlib data)") from None
    if inflater.unconsumed_tail:
        raise SealError(f"message exceeds {max_bytes} bytes")
    return message


class RawTcpTransport(_RawTransport):
    """``raw://HOST:1214``: the v2 raw protocol over TCP, every message AES-encrypted."""

    def __init__(
        self,
        host: str,
        port: int = 1214,
        *,
        cluster_name: str,
        secret: str,
        nodename: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        super().__init__(f"raw://{host}:{port}", timeout_s=timeout_s)
        self.host = host
        self.port = port
        self.cluster_name = cluster_name
        self.nodename = nodename or socket.gethostname()
        self._key = aes_key(secret)

    def __repr__(self) -> str:
        return f"RawTcpTransport({self.name!r}, cluster_name={self.cluster_name!r})"

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return reader, writer

    def _encode(self, message: dict[str, Any]) -> bytes:
        return seal(
            _json_encoder.encode(message), key=self._key, cluster_name=self.cluster_name, nodename=self.nodename
        )

    def _decode(self, frame: bytes, *, obj: str | None, key: str | None) -> Any:
        try:
            clear = unseal(frame, key=self._key)
        except SealError as exc:
            if "exceeds" in str(exc):
                raise OpenSVCRefusedError(f"reply {exc}", transport=self.name, obj=obj, key=key) from None
            raise OpenSVCAuthError(
                f"reply {exc} with our cluster secret: wrong secret or cluster name "
                f"(we sent cluster name {self.cluster_name!r})?",
                transport=self.name,
                obj=obj,
                key=key,
            ) from None
        return _decode_json(clear, transport=self.name, obj=obj, key=key)
