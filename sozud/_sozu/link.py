"""One connection to sozu's command socket: how it is opened (``Dialer``), what it speaks (``Link``),
and one exchange on it (a request frame, then frames until the final one)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from sozud._sozu.framing import Framing
from sozud.errors import SozuConnectionError, SozuError, SozuProtocolError
from sozud.proto import command_pb2 as pb
from sozud.versions import SozuVersion

__all__ = ["MAX_PROCESSING_FRAMES", "MAX_PROCESSING_KEPT", "Dialer", "Link", "bare_error", "exchange"]

# PROCESSING frames kept per request (sozu sends a few), and the most accepted before giving up on a peer.
MAX_PROCESSING_KEPT = 16
MAX_PROCESSING_FRAMES = 10_000


@dataclass
class Link:
    """One open connection to sozu, the framing it speaks and the version it was opened for (``how``:
    how that version was detected, None when it was given)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    framing: Framing
    version: SozuVersion | None = None
    how: str | None = None

    def alive(self) -> bool:
        """sozu has not closed it (an idle connection sozu closed is at EOF)."""
        return not self.reader.at_eof() and self.reader.exception() is None

    async def send(self, req: pb.Request) -> None:
        await self.send_frame(self.framing.encode(req))

    async def send_frame(self, frame: bytes) -> None:
        try:
            self.writer.write(frame)
            await self.writer.drain()
        except OSError as e:
            raise SozuConnectionError(f"write failed: {e}", socket_path=self.framing.socket_path) from None

    async def receive(self) -> pb.Response:
        return await self.framing.read(self.reader)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass(frozen=True)
class Dialer:
    """Opens connections to ``socket_path``; ``connect_timeout_s`` bounds each step (and a deadline,
    in loop time, the whole)."""

    socket_path: str
    max_frame_bytes: int
    connect_timeout_s: float

    def step_timeout_s(self, deadline: float | None) -> float:
        if deadline is None:
            return self.connect_timeout_s
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise SozuConnectionError("no time left to connect", socket_path=self.socket_path)
        return min(self.connect_timeout_s, remaining)

    async def open(self, framing: Framing, deadline: float | None) -> Link:
        try:
            async with asyncio.timeout(self.step_timeout_s(deadline)):
                reader, writer = await asyncio.open_unix_connection(self.socket_path, limit=self.max_frame_bytes + 1)
        except TimeoutError:
            raise SozuConnectionError("connection attempt timed out", socket_path=self.socket_path) from None
        except OSError as e:
            raise SozuConnectionError(f"cannot connect: {e.strerror or e}", socket_path=self.socket_path) from None
        return Link(reader, writer, framing)


async def exchange(link: Link, frame: bytes) -> tuple[pb.Response, list[pb.Response]]:
    """Write one request frame, read frames until the final one; the final frame and the PROCESSING
    frames before it (the first ``MAX_PROCESSING_KEPT``). No timeout here: the caller sets one."""
    await link.send_frame(frame)
    processing: list[pb.Response] = []
    seen = 0
    while True:
        resp = await link.receive()
        if resp.status != pb.PROCESSING:
            return resp, processing
        # sozu sends a few per request (one per stage or worker); keep the first ones only, and give up
        # on a peer that never ends (memory stays bounded whatever the timeout).
        seen += 1
        if len(processing) < MAX_PROCESSING_KEPT:
            processing.append(resp)
        if seen > MAX_PROCESSING_FRAMES:
            raise SozuProtocolError(
                f"more than {MAX_PROCESSING_FRAMES} PROCESSING frames for one request and no final answer "
                "(connection dropped, the next request reconnects)",
                socket_path=link.framing.socket_path,
            )


def bare_error(e: BaseException, socket_path: str) -> str:
    """An error's text without the ``sozu at <socket>:`` prefix (for messages that add their own)."""
    if isinstance(e, SozuError):
        return str(e).removeprefix(f"sozu at {socket_path}: ")
    return f"{type(e).__name__}: {e}"
