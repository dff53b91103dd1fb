"""The sharded shared-state layout (sozud/layout.py): shards and manifest, torn reads, the first layout
still read and migrated, bytes written per change, the private-key policy on the whole state."""

from __future__ import annotations

import re

import pytest
from conftest import FIXTURES
from structlog.testing import capture_logs

import sozud.layout
from sozud._om.base import OMSettings
from sozud._om.memory import MemoryTransport
from sozud.errors import OpenSVCRefusedError, SharedInFlightError, StateParseError
from sozud.layout import MAX_SHARDS, RECORDS_PER_SHARD, SHARDS, OpenSVCShared, assemble, shard_count, split_state
from sozud.om_api import OMClient
from sozud.state.codec import parse_state_file, write_state_file
from sozud.testing import builders as build

FILES = sorted(FIXTURES.glob("sozu-*/states/*.state"))
OBJ = "igw/sec/sozu"


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.parent.name}/{p.name}" for p in FILES])
def test_split_then_assemble_is_the_same_state(path: object) -> None:
    from pathlib import Path

    assert isinstance(path, Path)
    data = path.read_bytes()
    shards = split_state(data)
    assert len(shards) == SHARDS
    assert sum(s.count(b"\0") for s in shards) == data.count(b"\0")
    assert b"LISTENER" not in b"".join(shards[1:]), "listener records all go to shard 0 (they come first)"
    assert parse_state_file(assemble(shards), source="assembled") == parse_state_file(data, source="original")


def _generated(clusters: int, *, weight: int = 100) -> bytes:
    return write_state_file(build.fleet_state(clusters, changed_weight=weight))


def test_a_one_object_change_touches_at_most_two_shards() -> None:
    before, after = split_state(_generated(500)), split_state(_generated(500, weight=7))
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert 1 <= len(changed) <= 2


def _records(shard: bytes) -> list[tuple[bytes, bytes]]:
    """(id, body) of each record of a shard file."""
    out = []
    for record in shard.split(b"\0")[:-1]:
        m = re.match(rb'\{"id":"([^"]*)",', record)
        assert m is not None
        out.append((m[1], record[m.end() :]))
    return out


def test_a_record_goes_to_the_shard_its_body_picks_whatever_its_id_and_place() -> None:
    data = _generated(300)
    records = data.split(b"\0")[:-1]
    # the same records, in the reverse order and with ids that are not sozu's
    other = b"".join(
        re.sub(rb'^\{"id":"[^"]*",', b'{"id":"x%d",' % i, r, count=1) + b"\0" for i, r in enumerate(reversed(records))
    )
    ours, theirs = split_state(data, 8), split_state(other, 8)
    assert sum(len(_records(s)) for s in ours) == len(records)
    for mine, yours in zip(ours, theirs, strict=True):
        assert sorted(b for _, b in _records(mine)) == sorted(b for _, b in _records(yours))
        for shard in (mine, yours):  # each shard is a state file of its own, numbered from SAVE-0
            assert [i for i, _ in _records(shard)] == [b"SAVE-%d" % n for n in range(len(_records(shard)))]


def _client(transport: MemoryTransport) -> OMClient:
    return OMClient(transport, OMSettings(retry_attempts=1, request_timeout_s=5.0))


async def _read(port: OpenSVCShared) -> tuple[bytes | None, bytes | None]:
    """The port's read, with the state assembled into one plain state file."""
    data, meta = await port.read()
    return (None if data is None else data.assembled), meta


def _port(transport: MemoryTransport) -> OpenSVCShared:
    return OpenSVCShared(_client(transport), OBJ, "state.json", "state.json.meta", max_state_bytes=256 << 20)


async def test_write_then_read_and_only_changed_shards_are_rewritten() -> None:
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    port = _port(transport)
    data = _generated(300)
    await port.write(data, b'{"generation":1}\n')
    first = len(transport.writes)
    assert first == SHARDS + 1 and transport.writes[-1][1] == "state.json.manifest"
    reader = _port(transport)
    state, meta = await _read(reader)
    assert parse_state_file(state or b"", source="read") == parse_state_file(data, source="written")
    assert meta == b'{"generation":1}'
    await port.write(_generated(300, weight=7), b'{"generation":2}\n')
    rewritten = [k for _, k, _ in transport.writes[first:]]
    assert rewritten[-1] == "state.json.manifest" and 2 <= len(rewritten) <= 3
    before = len(transport.calls)
    await _read(reader)  # reads the manifest, the plain meta, and the changed shards only
    gets = [c for c in transport.calls[before:] if c[0] == "get"]
    assert len(gets) <= 4


async def test_a_write_compresses_only_the_shards_that_are_not_stored_as_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A push after a small change compresses the changed shards, not all of them; a shard whose stored
    value another writer replaced is compressed and sent again, whatever this port wrote before."""
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    port, other = _port(transport), _port(transport)
    encoded: list[bytes] = []
    real = sozud.layout.encode_shard

    def counting(data: bytes) -> bytes:
        encoded.append(data)
        return real(data)

    monkeypatch.setattr(sozud.layout, "encode_shard", counting)
    one, two = _generated(300), _generated(300, weight=7)
    await port.write(one, b'{"generation":1}\n')
    assert len(encoded) == SHARDS
    await _read(port)  # the port now holds the stored shards it fetched
    encoded.clear()
    await port.write(two, b'{"generation":2}\n')
    assert 1 <= len(encoded) <= 2, "the shards left as they were are not compressed again"
    changed = len(encoded)
    # another node writes the first state back; this port reads it (from the shards it holds, fetching
    # nothing), then writes its own state again: the shards it last encoded are no longer the stored ones
    await other.write(one, b'{"generation":3}\n')
    await _read(port)
    encoded.clear()
    first = len(transport.writes)
    await port.write(two, b'{"generation":4}\n')
    assert len(encoded) == changed and len(transport.writes) - first == changed + 1
    state, _ = await _read(_port(transport))
    assert parse_state_file(state or b"", source="read") == parse_state_file(two, source="written")


def test_the_shard_count_keeps_shards_small_and_does_not_flap_at_a_boundary() -> None:
    for records in [0, 1, 1000, 40_000, 200_001, 3_000_000, 10**9]:
        count = shard_count(records)
        assert SHARDS <= count <= MAX_SHARDS and count & (count - 1) == 0
        assert count in (SHARDS, MAX_SHARDS) or records / count <= RECORDS_PER_SHARD, (records, count)
        assert count == SHARDS or records / (count // 2) > RECORDS_PER_SHARD, "the fewest shards that keep that size"
    # a state whose size goes back and forth across a boundary keeps the count it has
    boundary = 64 * RECORDS_PER_SHARD
    count = shard_count(boundary - 1)
    for records in [boundary + 1, boundary - 1, boundary + 1]:
        assert shard_count(records, count) == count
    # far from it (a factor 4), it changes
    assert shard_count(boundary * 4, count) == shard_count(boundary * 4)
    assert shard_count(boundary // 4, count) == shard_count(boundary // 4)


async def test_a_larger_state_is_written_in_more_shards_and_a_smaller_one_leaves_no_old_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sozud.layout, "RECORDS_PER_SHARD", 8)  # 600 records: many shards at once
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    port = _port(transport)
    big = _generated(300)
    await port.write(big, b'{"generation":1}\n')
    count = shard_count(big.count(b"\0"))
    assert count > SHARDS
    shard_keys = sorted(k for k in transport.objects[OBJ] if k.startswith("state.json.s"))
    assert len(shard_keys) == count
    reader = _port(transport)
    state, _ = await _read(reader)
    assert parse_state_file(state or b"", source="r") == parse_state_file(big, source="w")
    # one object changed: still one or two shards rewritten, now each a smaller share of the state
    first = len(transport.writes)
    await port.write(_generated(300, weight=7), b'{"generation":2}\n')
    assert 2 <= len(transport.writes) - first <= 3
    # the state shrinks (a factor 4 at least): fewer shards, and those no manifest lists hold no records
    small = _generated(30)
    with capture_logs() as logs:
        await reader.write(small, b'{"generation":3}\n')
    fewer = shard_count(small.count(b"\0"))
    assert fewer < count
    assert [e["shards"] for e in logs if e["event"] == "shared.resharded"] == [fewer]
    stale = [k for k in transport.objects[OBJ] if k.startswith("state.json.s") and int(k[12:]) >= fewer]
    assert len(stale) == count - fewer
    for key in stale:
        assert sozud.layout.decode_shard(transport.objects[OBJ][key], source=key, max_bytes=1 << 20) == b""
    state, _ = await _read(_port(transport))
    assert parse_state_file(state or b"", source="r") == parse_state_file(small, source="w")
    # the node that still holds the larger manifest reads the smaller state (its stale shards are not read)
    state, _ = await _read(port)
    assert parse_state_file(state or b"", source="r") == parse_state_file(small, source="w")


async def test_a_shard_that_is_not_a_shard_is_an_error_at_once() -> None:
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    await _port(transport).write(_generated(50), b'{"generation":1}\n')
    transport.objects[OBJ]["state.json.s05"] = b"bm90IGl0\n"  # no sozud write leaves this: edited by hand
    with pytest.raises(StateParseError, match=r"s05\): not a compressed shard"):
        await _read(_port(transport))


class Replicating:
    """A node's client whose object is replaced, right after its ``after``-th write, by another node's
    whole object (the agent replicates whole objects): the rest of the write lands on that copy."""

    def __init__(self, transport: MemoryTransport, other: dict[str, bytes], after: int) -> None:
        self.client = _client(transport)
        self.transport, self.other, self.after = transport, other, after

    async def get_key(self, obj: str, key: str) -> bytes | None:
        return await self.client.get_key(obj, key)

    async def put_key(self, obj: str, key: str, value: bytes) -> None:
        await self.client.put_key(obj, key, value)
        self.after -= 1
        if self.after == 0:
            self.transport.objects[obj] = dict(self.other)

    async def wake_monitor(self, obj: str, reason: str) -> bool:
        return True

    def check_value(self, obj: str, key: str, value: bytes) -> None:
        pass


def _with(state: bytes, name: str) -> bytes:
    parsed = parse_state_file(state, source="s")
    parsed.add("cluster", build.cluster(name))
    return write_state_file(parsed)


async def test_two_nodes_writing_at_once_leave_torn_shards_read_as_stored_then_rewritten() -> None:
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    first = _generated(200)
    await _port(transport).write(first, b'{"generation":1}\n')
    a, b = _port(transport), _port(transport)
    await _read(a)
    await _read(b)
    ours, theirs = _with(first, "added-on-a"), _with(first, "added-on-b")
    before = dict(transport.objects[OBJ])
    await b.write(theirs, b'{"generation":2,"origin":"b"}\n')
    b_object = dict(transport.objects[OBJ])
    transport.objects[OBJ] = before  # node a's copy, which b's write has not reached yet
    # a writes its change; b's whole object lands on node a right after a's first shard
    a.client = Replicating(transport, b_object, after=1)
    await a.write(ours, b'{"generation":2,"origin":"a"}\n')
    reader = _port(transport)
    with pytest.raises(SharedInFlightError, match="a write in progress"):
        await _read(reader)
    assert reader.caveat == ""
    reader.mismatch_grace_s = 0.0
    state, meta = await _read(reader)
    assert meta == b'{"generation":2,"origin":"a"}'
    assert "additions only" in reader.caveat and ".s" in reader.caveat
    assert b"added-on-a" not in (state or b""), "a's shard was overwritten by b's object: it is not there"
    # the reader's next write (the engine pushes to repair) rewrites every shard that differs from the stored
    repaired = _with(_with(first, "added-on-a"), "added-on-b")
    await reader.write(repaired, b'{"generation":3}\n')
    fresh = _port(transport)
    state, _ = await _read(fresh)
    assert fresh.caveat == "" and parse_state_file(state or b"", source="r") == parse_state_file(repaired, source="w")


async def test_a_missing_shard_is_torn_not_unreadable() -> None:
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    await _port(transport).write(_generated(50), b'{"generation":1}\n')
    del transport.objects[OBJ]["state.json.s03"]
    reader = _port(transport)
    reader.mismatch_grace_s = 0.0
    state, _ = await _read(reader)
    assert "state.json.s03" in reader.caveat and state is not None


async def test_the_first_layout_is_read_and_migrated_once() -> None:
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    plain = (FIXTURES / "sozu-2.1.0/states/02-mid.state").read_bytes()
    transport.objects[OBJ]["state.json"] = plain
    transport.objects[OBJ]["state.json.meta"] = b'{"generation":4}\n'
    port = _port(transport)
    state, meta = await _read(port)
    assert state == plain and meta == b'{"generation":4}\n'
    with capture_logs() as logs:
        await port.write(plain, b'{"generation":5}\n')
        await port.write(plain, b'{"generation":6}\n')
    assert [e["event"] for e in logs].count("shared.migrated") == 1
    assert transport.objects[OBJ]["state.json"] == plain, "the plain key stays for sozud versions still on it"
    state, meta = await _read(_port(transport))
    assert meta == b'{"generation":6}' and parse_state_file(state or b"", source="s") == parse_state_file(
        plain, source="p"
    )
    # a node still on the first layout writes after the migration: its newer generation is read
    transport.objects[OBJ]["state.json.meta"] = b'{"generation":9}\n'
    reader = _port(transport)
    state, meta = await _read(reader)
    assert meta == b'{"generation":9}\n' and state == plain
    # written by a sozud that does not read the manifest (no push id): its state is merged additions only
    assert "additions only" in reader.caveat
    # and the next sharded write sends every shard (those stored may be older than the plain key)
    before = len(transport.writes)
    await reader.write(plain, b'{"generation":10,"id":"x"}\n')
    assert len(transport.writes) - before == SHARDS + 1
    # a plain key written by this version (layout = plain: metadata with a push id) is read as it is
    transport.objects[OBJ]["state.json.meta"] = b'{"generation":11,"id":"y"}\n'
    reader = _port(transport)
    _, meta = await _read(reader)
    assert meta == b'{"generation":11,"id":"y"}\n' and reader.caveat == ""


async def test_private_keys_are_checked_on_the_state_not_on_its_compressed_shards() -> None:
    transport = MemoryTransport(carries_text=True)
    transport.create_object("igw/cfg/sozu")
    port = OpenSVCShared(_client(transport), "igw/cfg/sozu", "state.json", "state.json.meta", max_state_bytes=1 << 20)
    with_keys = (FIXTURES / "sozu-2.1.0/states/01-populated.state").read_bytes()
    assert b"PRIVATE KEY" in with_keys
    with pytest.raises(OpenSVCRefusedError, match="private key"):
        await port.write(with_keys, b'{"generation":1}\n')
    assert transport.writes == []


async def test_key_get_assemble_prints_a_plain_state_file(
    tmp_path: object, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    import asyncio
    from pathlib import Path

    from sozud.main import main
    from sozud.om_api import client_from_url
    from sozud.testing.fake_opensvc import FakeOpenSVCCluster

    assert isinstance(tmp_path, Path)
    cluster = FakeOpenSVCCluster(monitor_interval_s=0)
    cluster.create_object(OBJ)
    data = (FIXTURES / "sozu-2.1.0/states/02-mid.state").read_bytes()
    async with cluster.agent("n1", tmp_path / "a") as agent:
        api = f"unix://{agent.lsnr_sock}"
        client = client_from_url(api, OMSettings(retry_attempts=1))
        try:
            await OpenSVCShared(client, OBJ, "state.json", "state.json.meta", max_state_bytes=1 << 20).write(
                data, b'{"generation":1}\n'
            )
        finally:
            await client.aclose()
        assert cluster.value("n1", OBJ, "state.json") is None
        rc = await asyncio.to_thread(main, ["key", "get", OBJ, "state.json", "--assemble", "--api", api])
    out = capsysbinary.readouterr().out
    assert rc == 0 and parse_state_file(out, source="printed") == parse_state_file(data, source="written")
