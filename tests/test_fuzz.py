"""Fuzzing hostile input (issue 12): state files and sozu command sockets.

- State files: every captured fixture state, mutated by a seeded generator (byte flips, cuts, duplicated
  or dropped records, deep nesting, huge or invalid strings, unknown fields, wrong types, stray NULs).
  Each case is parsed (only ``StateError`` may come out, within a bounded amount of memory), and a case
  that does not parse is offered to the sync engine as the shared state: it must change nothing live and
  push nothing.
- Sockets: a hostile "sozu" per case (garbage, cut frames, lying lengths, floods, silence, bad protobuf or
  JSON, invalid UTF-8, deep nesting...) answers a ``SozuChannel`` request, and a live read of the sync
  adapter: only ``SozuError`` may come out, never later than the request timeout allows.

``SOZUD_FUZZ_SCALE`` multiplies the case counts (default 1: 2,400 state files, 240 socket behaviours).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FIXTURES
from test_sync import MemShared, MemSozu

from sozud.errors import SozudError, SozuError, StateError
from sozud.persist import BaseStore
from sozud.proto import command_pb2 as pb
from sozud.socket_proto import SozuChannel
from sozud.state.codec import parse_state_file
from sozud.state.live import read_live_report
from sozud.sync import EngineSettings, SyncEngine
from sozud.versions import SozuVersion

SCALE = max(1, int(os.environ.get("SOZUD_FUZZ_SCALE", "1")))
STATE_CASES_PER_FILE = 200 * SCALE  # x 12 fixture files = 2,400 in CI
SOCKET_CASES = 240 * SCALE
VERSIONS = {"sozu-2.1.0": "2.1.0", "sozu-1.1.1": "1.1.1", "sozu-0.15.19": "0.15.19"}
FILES = sorted(p for d in VERSIONS for p in (FIXTURES / d / "states").glob("*.state"))


# --- state files ------------------------------------------------------------------------------------------


def _records(data: bytes) -> list[bytes]:
    return [r for r in data.split(b"\0")[:-1]]


def _join(records: list[bytes]) -> bytes:
    return b"".join(r + b"\0" for r in records)


MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    lambda d, r: d[: r.randrange(len(d))],  # cut anywhere
    lambda d, r: bytes(b ^ (1 << r.randrange(8)) if r.random() < 0.01 else b for b in d),  # bit flips
    lambda d, r: d[: (i := r.randrange(len(d)))] + b"\0" + d[i:],  # a stray NUL
    lambda d, r: d[: (i := r.randrange(len(d)))] + b"\xff\xfe" + d[i:],  # invalid UTF-8
    lambda d, r: _join([*(recs := _records(d)), r.choice(recs)]) if _records(d) else d,  # a duplicate
    lambda d, r: _join([x for x in _records(d) if r.random() > 0.3]),  # dropped records
    lambda d, r: _join(r.sample(_records(d), len(_records(d)))),  # shuffled records
    lambda d, r: d.replace(b'"cluster_id":"', b'"cluster_id":"' + b"x" * r.choice([1, 1000, 250_000]), 1),
    lambda d, r: d.replace(b'"content":', b'"content":' + b"[" * r.choice([50, 1000, 5000]), 1),
    lambda d, r: d.replace(b"{", b'{"unknown_field":1,', 1 + r.randrange(3)),
    lambda d, r: d.replace(b'"sticky_session":true', b'"sticky_session":"yes"', 1),
    lambda d, r: d.replace(b":null", b":" + r.choice([b"[]", b"{}", b"1e999", b'"x"', b"-1"]), 1),
    lambda d, r: d.replace(b'"port":', b'"port":' + r.choice([b"-", b"99999999999", b"1.5,"]), 1),
    lambda d, r: d + r.randbytes(r.randrange(1, 64)),  # trailing garbage
    lambda d, r: r.randbytes(r.randrange(0, 2048)),  # noise
    lambda d, r: (
        b'{"id":"SAVE-0","content":{"request_type":{"ADD_CLUSTER":{"cluster_id":"a","answers":'
        + b'{"a":' * r.choice([10, 2000])
        + b"1"
        + b"}" * r.choice([10, 2000])
        + b"}}}}\n\0"
    ),
]


def _fuzzed(path: Path, seed: int) -> bytes:
    rng = random.Random(f"{path.parent.parent.name}/{path.name}/{seed}")
    data = path.read_bytes()
    for _ in range(rng.choice([1, 1, 2, 3])):
        data = rng.choice(MUTATIONS)(data or b"\0", rng)
    return data


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.parent.name}/{p.name}" for p in FILES])
def test_mutated_state_files_parse_or_fail_cleanly_in_bounded_memory(path: Path) -> None:
    version = SozuVersion.parse(VERSIONS[path.parent.parent.name])
    outcomes = {"parsed": 0, "refused": 0}
    tracemalloc.start()
    try:
        for seed in range(STATE_CASES_PER_FILE):
            data = _fuzzed(path, seed)
            tracemalloc.reset_peak()
            try:
                parse_state_file(data, version, source="fuzz")
                outcomes["parsed"] += 1
            except StateError:
                outcomes["refused"] += 1
            _, peak = tracemalloc.get_traced_memory()
            # a parse costs a bounded multiple of its input (protobuf objects, a few copies), never more
            assert peak < 64 * len(data) + 16_000_000, f"seed {seed}: {peak} bytes for {len(data)} bytes of input"
    finally:
        tracemalloc.stop()
    assert sum(outcomes.values()) == STATE_CASES_PER_FILE
    assert outcomes["refused"] > 0


async def test_a_shared_state_that_does_not_parse_changes_nothing_live() -> None:
    root = Path(tempfile.mkdtemp(prefix="szf"))
    try:
        base_file = FIXTURES / "sozu-2.1.0/states/01-populated.state"
        live = parse_state_file(base_file.read_bytes(), source="fixture")
        checked = 0
        for seed in range(STATE_CASES_PER_FILE):
            data = _fuzzed(base_file, 10_000 + seed)
            try:
                parse_state_file(data, live.version, source="probe")
                continue  # a valid state: applying it is the engine's job, not a fault
            except StateError:
                pass
            sozu, shared = MemSozu(live.copy()), MemShared()
            engine = SyncEngine(sozu, shared, BaseStore(root / str(seed)), EngineSettings(node="f"))  # type: ignore[arg-type]
            await engine.sync_once()  # bootstrap, then base
            await engine.sync_once()
            writes = shared.writes
            shared.state = data
            if not data.strip(b"\n\0 \t\r"):  # an empty key is bootstrapped again from live (documented)
                await engine.sync_once("fuzz")
                assert sozu.live == live and sozu.applies == 0 and shared.writes == writes + 1
                continue
            with pytest.raises(SozudError):
                await engine.sync_once("fuzz")
            assert sozu.live == live and sozu.applies == 0 and shared.writes == writes
            checked += 1
        assert checked > STATE_CASES_PER_FILE // 4
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- sockets ----------------------------------------------------------------------------------------------


def _pframe(body: bytes) -> bytes:
    return struct.pack("<Q", len(body) + 8) + body


def _response(status: int, message: str = "m") -> bytes:
    return pb.Response(status=status, message=message).SerializeToString()


BEHAVIOURS: list[Callable[[random.Random, bool], list[bytes | None]]] = [
    # each returns chunks to send after reading the request; None = stay silent until closed
    lambda r, j: [],  # close at once
    lambda r, j: [r.randbytes(r.randrange(1, 300))],  # garbage
    lambda r, j: [struct.pack("<Q", r.choice([0, 3, 7, 2**40, 2**63]))],  # a lying length
    lambda r, j: [struct.pack("<Q", 100) + b"short"],  # a cut frame
    lambda r, j: [_pframe(r.randbytes(r.randrange(1, 80)))],  # invalid protobuf
    lambda r, j: [_pframe(_response(pb.PROCESSING))] * r.randrange(1, 40) + [None],  # processing, then silence
    lambda r, j: [_pframe(b"\x08\x07\x12\x01m")],  # an unknown status (7)
    lambda r, j: [_pframe(_response(pb.FAILURE, "x" * r.randrange(1, 5000)))],
    lambda r, j: [None],  # silence
    lambda r, j: [b"{" * r.choice([10, 5000]) + b"\0"],  # deep JSON
    lambda r, j: [b'{"id":"x","status":"OK","message":"\xff\xfe"}\0'],  # invalid UTF-8 in JSON
    lambda r, j: [b'{"id":"x","status":"OK"' + b" " * r.randrange(1, 100)],  # JSON without its NUL
    lambda r, j: [b'{"id":"x","status":"FAILURE","message":"no"}\0' if j else _pframe(_response(pb.FAILURE))],
    lambda r, j: [b"[1,2,3]\0" if j else _pframe(b"\x08\x00")],  # the wrong shape
]


async def _hostile(path: str, seed: int, json_socket: bool) -> asyncio.Server:
    rng = random.Random(seed)
    plan = rng.choice(BEHAVIOURS)(rng, json_socket)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)  # the request (whatever it is)
            for chunk in plan:
                if chunk is None:
                    await reader.read()  # silent until the client gives up
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_unix_server(serve, path=path)


async def _one_socket_case(d: str, seed: int) -> str:
    versions = ["2.1.0", "1.1.1", "0.15.19"]
    version = SozuVersion.parse(versions[seed % 3])
    path = os.path.join(d, f"{seed}.sock")
    server = await _hostile(path, seed, version.json_socket)
    timeout_s = 0.5
    ch = SozuChannel(path, version=version, request_timeout_s=timeout_s)
    try:
        try:
            # a hang shows as asyncio.TimeoutError here (the channel's own timeout is much shorter)
            if seed % 2:
                await asyncio.wait_for(ch.request(pb.Request(list_listeners=pb.ListListeners())), 10 * timeout_s)
            else:
                await asyncio.wait_for(read_live_report(ch), 30 * timeout_s)
            return "answered"
        except SozuError:
            return "refused"
    finally:
        await ch.aclose()
        server.close()


async def test_hostile_sockets_end_in_a_sozu_error_in_time() -> None:
    d = tempfile.mkdtemp(prefix="szh")
    try:
        results = await asyncio.gather(*(_one_socket_case(d, seed) for seed in range(SOCKET_CASES)))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert len(results) == SOCKET_CASES
    assert results.count("refused") > SOCKET_CASES // 2
