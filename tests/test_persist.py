"""BaseStore: the base in one file or in parts, crash safety of every save, damaged bases."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import msgspec
import pytest

from sozud import persist
from sozud.errors import StateError, StateParseError
from sozud.layout import split_state
from sozud.persist import BaseMeta, BaseStore
from sozud.state.codec import write_state_file
from sozud.state.model import ConfigState
from sozud.testing.builders import fleet_state
from sozud.versions import V2_1_0

V2 = V2_1_0
Layout = Literal["file", "parts"]


def as_parts(state: ConfigState, shards: int = 16) -> list[tuple[str, bytes]]:
    """``state`` as the engine hands it: the layout's shards, each with a content id (two empty shards
    share one)."""
    return [(hashlib.sha256(p).hexdigest()[:32], p) for p in split_state(write_state_file(state), shards)]


def save(store: BaseStore, state: ConfigState, layout: Layout, *, shards: int = 16) -> None:
    meta = BaseMeta(generation=len(state))
    if layout == "parts":
        store.save(state, meta, parts=as_parts(state, shards))
    else:
        store.save(state, meta)


def files(d: Path) -> set[str]:
    """What the state directory holds (parts as ``base.parts/<id>``)."""
    out = {p.name for p in d.iterdir() if p.is_file()}
    if (d / "base.parts").is_dir():
        out |= {f"base.parts/{p.name}" for p in (d / "base.parts").iterdir()}
    return out


def expected_files(state: ConfigState, layout: Layout, shards: int = 16) -> set[str]:
    if layout == "file":
        return {"base.meta.json", "base.state"}
    return {"base.meta.json"} | {f"base.parts/{i}" for i, _ in as_parts(state, shards)}


def loaded(d: Path) -> ConfigState | None:
    """What a restarted sozud reads (a fresh store: no cache)."""
    got = BaseStore(d).load(V2)
    return None if got is None else got[0]


# --- round trips and cost ------------------------------------------------------------------------------


@pytest.mark.parametrize("clusters", [3, 300])
def test_parts_round_trip(tmp_path: Path, clusters: int) -> None:
    state = fleet_state(clusters)
    parts = as_parts(state)
    if clusters == 3:
        assert len({i for i, _ in parts}) < len(parts), "two empty shards share an id (one file)"
    store = BaseStore(tmp_path)
    store.save(state, BaseMeta(generation=3, shared_id="p1"), parts=parts)
    got = BaseStore(tmp_path).load(V2)
    assert got is not None
    assert got[0] == state and got[0].digest() == state.digest()
    assert got[1].generation == 3 and got[1].shared_id == "p1" and got[1].parts == [i for i, _ in parts]
    assert files(tmp_path) == expected_files(state, "parts")
    again = store.load(V2)  # the store that saved it keeps it: no parse
    assert again is not None and again[0] is state


def test_a_save_with_parts_and_a_digest_computes_no_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = fleet_state(10)
    digest = state.digest()

    def no_digest(self: ConfigState) -> str:
        raise AssertionError("digest computed")

    monkeypatch.setattr(ConfigState, "digest", no_digest)
    BaseStore(tmp_path).save(state, BaseMeta(), parts=as_parts(state), digest=digest)
    monkeypatch.undo()
    assert loaded(tmp_path) == state


def test_no_parts_is_the_empty_state_in_one_file(tmp_path: Path) -> None:
    empty = ConfigState(V2)
    BaseStore(tmp_path).save(empty, BaseMeta(), parts=[])
    assert loaded(tmp_path) == empty and files(tmp_path) == {"base.meta.json", "base.state"}


@contextmanager
def recorded(monkeypatch: pytest.MonkeyPatch, crash_at: int | None = None) -> Iterator[list[str]]:
    """Every file written or deleted by the store, as ``write <path>`` / ``delete <path>`` (relative to the
    state directory's parent); with ``crash_at``, the process "dies" just before that operation (1-based)."""
    ops: list[str] = []
    real_write, real_delete = persist.atomic_write, persist._delete

    def op(what: str, path: Path) -> None:
        ops.append(f"{what} {path.parent.name}/{path.name}")
        if len(ops) == crash_at:
            raise Crash(ops[-1])

    def write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
        op("write", path)
        real_write(path, data, mode=mode)

    def delete(path: Path) -> None:
        op("delete", path)
        real_delete(path)

    with monkeypatch.context() as m:
        m.setattr(persist, "atomic_write", write)
        m.setattr(persist, "_delete", delete)
        yield ops


class Crash(Exception):
    """The process died here."""


def test_a_save_changing_one_backend_writes_its_parts_and_the_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = fleet_state(200), fleet_state(200, changed_weight=7)
    pa, pb = as_parts(a), as_parts(b)
    new_ids = [i for i, _ in pb if i not in dict(pa)]
    old_ids = sorted(i for i, _ in pa if i not in dict(pb))
    assert 1 <= len(new_ids) <= 2 and len(old_ids) == len(new_ids), "the record changes, or moves to another shard"
    store = BaseStore(tmp_path / "s")
    store.save(a, BaseMeta(), parts=pa)
    with recorded(monkeypatch) as ops:
        store.save(b, BaseMeta(), parts=pb, digest=b.digest())
    assert ops == [
        *(f"write base.parts/{i}" for i in new_ids),
        "write s/base.meta.json",
        *(f"delete base.parts/{i}" for i in old_ids),
        "delete s/base.state",
    ]
    assert loaded(tmp_path / "s") == b and files(tmp_path / "s") == expected_files(b, "parts")


def test_switching_between_one_file_and_parts(tmp_path: Path) -> None:
    store = BaseStore(tmp_path)
    seq: list[tuple[ConfigState, Layout]] = [
        (fleet_state(5), "file"),
        (fleet_state(8), "parts"),
        (fleet_state(8, changed_weight=3), "parts"),
        (fleet_state(6), "file"),
        (fleet_state(6, changed_weight=9), "file"),
        (fleet_state(7), "parts"),
    ]
    for state, layout in seq:
        save(store, state, layout)
        assert loaded(tmp_path) == state
        assert files(tmp_path) == expected_files(state, layout)
        got = store.load(V2)
        assert got is not None and got[0] == state and bool(got[1].parts) == (layout == "parts")


def test_a_base_saved_by_another_store_is_read_again(tmp_path: Path) -> None:
    one, other = BaseStore(tmp_path), BaseStore(tmp_path)
    save(one, fleet_state(4), "parts")
    assert one.load(V2) is not None
    save(other, fleet_state(4, changed_weight=5), "parts")
    got = one.load(V2)
    assert got is not None and got[0] == fleet_state(4, changed_weight=5)


# --- crash safety ---------------------------------------------------------------------------------------

SHARDS = 4  # few parts: every crash point of every transition stays cheap
PAIRS = {
    "one_part": (fleet_state(12), fleet_state(12, changed_weight=1)),
    "grown": (fleet_state(12), fleet_state(15)),
    "first": (None, fleet_state(12)),
}
LAYOUTS: tuple[Layout, Layout] = ("file", "parts")


def save_ops(d: Path, state: ConfigState, layout: Layout, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many file operations this save makes (on a copy of the scenario in ``d``)."""
    with recorded(monkeypatch) as ops:
        save(BaseStore(d), state, layout, shards=SHARDS)
    return len(ops)


def restart(d: Path) -> ConfigState | None:
    """What the engine does at start: load; a base that does not match its files is set aside (none)."""
    store = BaseStore(d)
    try:
        got = store.load(V2)
    except StateError:
        store.set_aside()
        return None
    return None if got is None else got[0]


def crashed_save(d: Path, state: ConfigState, layout: Layout, k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with recorded(monkeypatch, crash_at=k), pytest.raises(Crash):
        save(BaseStore(d), state, layout, shards=SHARDS)


def outcome(d: Path, before: ConfigState | None, after: ConfigState) -> str:
    """ "before", "after" or "damaged" (a StateError); anything else fails the test."""
    try:
        got = loaded(d)
    except StateError:
        return "damaged"
    if got == after:
        return "after"
    assert got == before, f"load returned neither the base before the save nor the one saved ({files(d)})"
    return "before"


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize(("old", "new"), list(itertools.product(LAYOUTS, LAYOUTS)))
def test_a_crash_anywhere_in_a_save_leaves_the_old_or_the_new_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pair: str, old: Layout, new: Layout
) -> None:
    before, after = PAIRS[pair]

    def setup(d: Path) -> Path:
        if before is not None:
            save(BaseStore(d), before, old, shards=SHARDS)
        return d

    n = save_ops(setup(tmp_path / "count"), after, new, monkeypatch)
    seen = []
    for k in range(1, n + 1):
        d = setup(tmp_path / f"crash{k}")
        crashed_save(d, after, new, k, monkeypatch)
        seen.append(outcome(d, before, after))
        # the next start and save repair it: the new base, and no file left of the crashed save
        restart(d)
        final = fleet_state(13, changed_weight=4)
        save(BaseStore(d), final, new, shards=SHARDS)
        assert loaded(d) == final
        assert files(d) - {f for f in files(d) if f.endswith(".damaged")} == expected_files(final, new, SHARDS)
    assert seen[0] == "before", "a crash before the first write leaves the base as it was"
    assert "damaged" not in seen or new == "file", "a save in parts never leaves a base that does not load"


@pytest.mark.parametrize(("first", "second", "third"), list(itertools.product(LAYOUTS, LAYOUTS, LAYOUTS)))
def test_a_crash_after_a_crashed_save_never_brings_back_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: Layout, second: Layout, third: Layout
) -> None:
    a, b, c = fleet_state(10), fleet_state(11), fleet_state(11, changed_weight=2)

    def setup(d: Path) -> Path:
        save(BaseStore(d), a, first, shards=SHARDS)
        return d

    nb = save_ops(setup(tmp_path / "count"), b, second, monkeypatch)
    for k in range(1, nb + 1):
        d = setup(tmp_path / f"b{k}")
        crashed_save(d, b, second, k, monkeypatch)
        previous = restart(d)
        assert previous in (a, b, None)
        nc = save_ops(_copy(d, tmp_path / f"b{k}count"), c, third, monkeypatch)
        for j in range(1, nc + 1):
            dj = _copy(d, tmp_path / f"b{k}c{j}")
            crashed_save(dj, c, third, j, monkeypatch)
            outcome(dj, previous, c)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_dir():
            _copy(p, dst / p.name)
        else:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


# --- damaged bases ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../x", "a/b", "/etc/passwd", ".", "..", "", ".hidden", "a b", "x" * 129, "é"])
def test_a_part_id_that_could_be_a_path_is_refused(tmp_path: Path, bad: str) -> None:
    state = fleet_state(3)
    data = write_state_file(state)
    with pytest.raises(StateError, match="part id"):
        BaseStore(tmp_path / "s").save(state, BaseMeta(), parts=[("abc", data[:0]), (bad, data)])
    assert not (tmp_path / "s").exists() or files(tmp_path / "s") == set()


def test_a_meta_listing_a_path_is_a_damaged_base(tmp_path: Path) -> None:
    save(BaseStore(tmp_path), fleet_state(3), "file")
    meta = msgspec.json.decode((tmp_path / "base.meta.json").read_bytes(), type=BaseMeta)
    meta.parts = ["..", "base.state"]
    (tmp_path / "base.meta.json").write_bytes(msgspec.json.encode(meta))
    with pytest.raises(StateParseError, match=r"base\.meta\.json.*part id '\.\.'"):
        loaded(tmp_path)


def test_the_same_id_with_two_contents_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="part id aa given two contents"):
        BaseStore(tmp_path).save(ConfigState(V2), BaseMeta(), parts=[("aa", b""), ("aa", b"x\0")])
    assert not (tmp_path / "base.meta.json").exists()


def test_a_missing_part_is_an_error_naming_it(tmp_path: Path) -> None:
    state = fleet_state(20)
    store = BaseStore(tmp_path)
    store.save(state, BaseMeta(), parts=as_parts(state))
    assert store.load(V2) is not None
    gone = tmp_path / "base.parts" / as_parts(state)[5][0]
    gone.unlink()
    for reader in (store, BaseStore(tmp_path)):  # the cache notices too
        with pytest.raises(StateParseError, match="part file missing") as e:
            reader.load(V2)
        assert e.value.source == str(gone)


def test_a_bad_record_in_a_part_names_the_part_and_its_record(tmp_path: Path) -> None:
    state = fleet_state(20)
    parts = as_parts(state)
    BaseStore(tmp_path).save(state, BaseMeta(), parts=parts)
    part_id, data = next((i, p) for i, p in parts[1:] if p.count(b"\0") >= 3)
    records = data.split(b"\0")[:-1]
    records[2] = b'{"id":"SAVE-2","content":{"request_type":{"NO_SUCH_REQUEST":{}}}}'
    path = tmp_path / "base.parts" / part_id
    path.write_bytes(b"".join(r + b"\0" for r in records))
    with pytest.raises(StateParseError) as e:
        loaded(tmp_path)
    assert (e.value.source, e.value.record) == (str(path), 2)
    path.write_bytes(data[:-1])  # the last NUL lost
    with pytest.raises(StateParseError, match="truncated") as e:
        loaded(tmp_path)
    assert e.value.source == str(path)


def test_a_part_whose_content_changed_does_not_match_the_digest(tmp_path: Path) -> None:
    a, b = fleet_state(20), fleet_state(20, changed_weight=2)
    BaseStore(tmp_path).save(a, BaseMeta(), parts=as_parts(a))
    for (i, old), (_, new) in zip(as_parts(a), as_parts(b), strict=True):
        if old != new:
            (tmp_path / "base.parts" / i).write_bytes(new)
    with pytest.raises(StateParseError, match="does not match the digest"):
        loaded(tmp_path)


def test_a_part_left_as_it_was_by_a_save_then_changed_behind_the_store_is_read_again(tmp_path: Path) -> None:
    """A save checks the identity only of the files it writes, and keeps the ones it knew for the others: a
    part changed behind the store's back after that still misses the cache at the next load."""
    a, b = fleet_state(20), fleet_state(20, changed_weight=2)
    store = BaseStore(tmp_path)
    store.save(a, BaseMeta(), parts=as_parts(a))
    assert store.load(V2) is not None
    store.save(b, BaseMeta(), parts=as_parts(b))
    assert store.load(V2) is not None
    kept = [(i, p) for i, p in as_parts(b) if (i, p) in as_parts(a) and p.count(b"\0") > 1]
    assert kept, "a part the second save did not write"
    i, part = kept[0]
    (tmp_path / "base.parts" / i).write_bytes(part[: part.index(b"\0") + 1])  # its first record only
    with pytest.raises(StateParseError, match="does not match the digest"):
        store.load(V2)


def test_set_aside_and_clear_take_the_parts_too(tmp_path: Path) -> None:
    store = BaseStore(tmp_path)
    first = fleet_state(6)
    save(store, first, "parts")
    kept = store.set_aside()
    assert kept == str(tmp_path / "base.parts.damaged")
    assert store.load(V2) is None
    assert {p.name for p in tmp_path.iterdir()} == {"base.parts.damaged", "base.meta.json.damaged"}
    second = fleet_state(7)
    save(store, second, "parts")
    store.set_aside()  # an earlier damaged base is replaced
    assert {p.name for p in (tmp_path / "base.parts.damaged").iterdir()} == {i for i, _ in as_parts(second)}
    save(store, first, "parts")
    store.clear()
    assert store.load(V2) is None and {p.name for p in tmp_path.iterdir()} == {
        "base.parts.damaged",
        "base.meta.json.damaged",
    }
    save(store, first, "file")
    assert store.set_aside() == str(tmp_path / "base.state.damaged")
    assert os.path.exists(tmp_path / "base.state.damaged")
