"""How the shared state is laid out in the OpenSVC object: compressed shards and a manifest.

The v2 agent keeps every key of an object in one file and, after each write, re-reads, checksums,
re-projects and replicates the whole object: its cost grows with the object's total size (a 10.8 MB key
took 2.2 s to write and kept the agent busy for ~11 s). With ``layout = "sharded"`` (experimental, not the
default: two nodes pushing at once can leave a manifest listing a shard the other overwrote, see README)
the state is not one plain key:

- ``<key>.s00``, ``<key>.s01``, ...: shards. The state file's records are split by a hash of each record's
  content (listener records, which must come first and in order, all go to shard 0), renumbered within
  their shard, zlib-compressed and base64-encoded (the v2 API carries text; every value ends with a
  newline). A one-object change rewrites one or two shards. There are 16 shards up to 32,768 records,
  then twice as many each time the state doubles (about 2,048 records a shard, at most 1,024 shards), so
  what one change rewrites, fetches and decompresses stays small at any size. A writer keeps the count
  the manifest has while it is within a factor of two of that (a state whose size hovers at a boundary
  does not rewrite every shard); readers take whatever count the manifest lists.
- ``<key>.manifest``: written last; the shards' keys and digests and sozud's metadata (generation,
  origin, lineage). A reader takes the manifest, reads only the shards whose digest it has not seen, and
  checks each against the manifest: a shard from another write than its manifest (a torn read) is a
  write in progress (``SharedInFlightError``), never a state.

Reassembled, the shards in order are a plain sozu state file (listeners first, records renumbered), what
``sozud key get --assemble`` prints for ``sozu state load``.

The first layout (one plain key ``<key>`` and its metadata ``<key>.meta``) is still read: when there is no
manifest yet (the object was written by an earlier sozud, or by the old watch script), or when that plain
key carries a newer generation than the manifest (a node not yet switched wrote it). The first push from
this layout then writes shards and a manifest (``shared.migrated``); the plain key is left for earlier
sozud versions until the operator removes it.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import msgspec

from sozud.errors import SharedInFlightError, StateParseError
from sozud.log import get_logger

SHARDS = 16  # the fewest shards of a sharded write
MAX_SHARDS = 1024
RECORDS_PER_SHARD = 2048
LAYOUT_FORMAT = 2
_ID = re.compile(rb'^\{"id":"[^"]*",')
# One record of a whole file, up to its NUL: group 1 its id, when it starts with one (then group 2 tells a
# listener record); an id never runs past the record's NUL.
_RECORD_AT = re.compile(rb'(?:(\{"id":"[^"\0]*",)("content":\{"request_type":\{"[A-Z_]*LISTENER")?)?[^\0]*\0')


class KeyStore(Protocol):
    """What the layout needs of the OpenSVC client: one object's keys."""

    async def get_key(self, obj: str, key: str) -> bytes | None: ...

    async def put_key(self, obj: str, key: str, value: bytes) -> None: ...

    async def wake_monitor(self, obj: str, reason: str) -> bool: ...

    def check_value(self, obj: str, key: str, value: bytes) -> None: ...


class ShardRef(msgspec.Struct, frozen=True):
    key: str
    digest: str  # sha-256 of the stored (encoded) value
    records: int


class Manifest(msgspec.Struct, kw_only=True):
    format: int = LAYOUT_FORMAT
    shards: list[ShardRef]
    meta: msgspec.Raw  # sozud's metadata (sozud.sync.SharedMeta), kept as its own JSON
    # sha-256 of the plain metadata key's value when this manifest was written ("" when absent): a plain
    # metadata value that differs was written later, by a node writing the plain layout
    plain_meta: str | None = None


# --- pure functions -----------------------------------------------------------------------------------


def _renumber(records: list[bytes]) -> bytes:
    return b"".join(_ID.sub(b'{"id":"SAVE-%d",' % i, r, count=1) + b"\0" for i, r in enumerate(records))


def split_state(data: bytes, shards: int = SHARDS) -> list[bytes]:
    """The state file ``data`` as ``shards`` state files (each renumbered from SAVE-0)."""
    return list(iter_shards(data, shards))


def iter_shards(data: bytes, shards: int = SHARDS) -> Iterator[bytes]:
    """:func:`split_state` one shard at a time: records are placed by their offsets in ``data``, and a
    shard's file is built when its turn comes, so that one shard's bytes are alive at a time beside
    ``data`` (not a second copy of the whole state)."""
    places = [array("q") for _ in range(shards)]  # per shard: (start, body start, end) of each record
    view = memoryview(data)
    for m in _RECORD_AT.finditer(data, 0, data.rfind(b"\0") + 1):  # bytes after the last NUL: no record
        start, end = m.start(), m.end() - 1  # end: the record's NUL
        body = m.end(1) if m.start(1) >= 0 else start
        if m.start(2) >= 0:
            index = 0  # a listener record
        else:
            index = int.from_bytes(hashlib.blake2b(view[body:end], digest_size=4).digest(), "big") % shards
        places[index].extend((start, body, end))
    for offsets in places:
        pieces: list[bytes | memoryview] = []
        for n in range(0, len(offsets), 3):
            start, body, end = offsets[n], offsets[n + 1], offsets[n + 2]
            if body > start:  # the record had an id: renumbered
                pieces.append(b'{"id":"SAVE-%d",' % (n // 3))
            pieces.append(view[body:end])
            pieces.append(b"\0")
        yield b"".join(pieces)


def shard_count(records: int, current: int = 0) -> int:
    """How many shards a write of ``records`` records makes, when the stored layout has ``current`` (0:
    none) (module docstring)."""
    want = SHARDS
    while want < MAX_SHARDS and want * RECORDS_PER_SHARD < records:
        want *= 2
    if want // 2 <= current <= min(want * 2, MAX_SHARDS) and current >= SHARDS:
        return current
    return want


def assemble(shard_files: list[bytes]) -> bytes:
    """Shard state files, in order, as one plain state file (renumbered)."""
    records = [r for data in shard_files for r in data.split(b"\0")[:-1]]
    return _renumber(records)


def _file_id(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def encode_shard(data: bytes) -> bytes:
    text = base64.b64encode(zlib.compress(data, 6))
    return b"\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + b"\n"


def decode_shard(value: bytes, *, source: str, max_bytes: int) -> bytes:
    try:
        raw = base64.b64decode(b"".join(value.split()), validate=True)
        d = zlib.decompressobj()
        out = d.decompress(raw, max_bytes + 1)
    except (ValueError, zlib.error) as e:
        raise StateParseError(f"not a compressed shard: {e}", source=source) from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise StateParseError(f"shard expands beyond {max_bytes} bytes", source=source)
    return out


def digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


@dataclass(frozen=True, eq=False)
class SharedData:
    """The shared state as one read found it: its parts in order (the shards of the sharded layout, or
    the one plain key), each a sozu state file with an id that changes whenever its bytes do. A reader
    that saw a part's id before may reuse what it made of it."""

    parts: tuple[tuple[str, bytes], ...]
    # Every part is the one the metadata lists (a sharded read, no torn shard): the state is the one the
    # metadata describes, whose digest its writer computed; no need to compute it again.
    vouched: bool = False

    @classmethod
    def plain(cls, data: bytes) -> SharedData:
        """One plain state file (its id: the sha-256 of its bytes)."""
        return cls(((hashlib.sha256(data).hexdigest(), data),))

    @cached_property
    def assembled(self) -> bytes:
        """The parts as one plain state file (records renumbered across parts)."""
        if len(self.parts) == 1:
            return self.parts[0][1]
        return assemble([data for _, data in self.parts])

    def is_blank(self) -> bool:
        """No record at all (an absent, empty or whitespace-only key)."""
        return not any(data.strip(b"\n\0 \t\r") for _, data in self.parts)


# --- the port -------------------------------------------------------------------------------------------


class OpenSVCShared:
    """:class:`~sozud.sync.SharedPort` over an OpenSVC object holding the shared state (see the module doc).

    Reads either layout (the newest: a manifest, or a plain key written after it); writes the sharded
    layout, or the plain key with ``sharded=False`` (``layout = "plain"``, e.g. while nodes that read only
    the plain key remain). A read costs the manifest, the plain metadata and the shards whose digest was
    not fetched and checked before; a write sends only the shards whose stored value differs (as last
    read), then the manifest.
    """

    def __init__(
        self, client: KeyStore, obj: str, key: str, meta_key: str, *, max_state_bytes: int, sharded: bool = True
    ) -> None:
        self.client = client
        self.obj = obj
        self.key = key
        self.meta_key = meta_key
        self.manifest_key = f"{key}.manifest"
        self.max_state_bytes = max_state_bytes
        self.sharded = sharded
        self.writes = 0
        self.bytes_written = 0
        # Why the state last read may not be the one its metadata describes ("" when it is): the engine
        # then propagates no removal from it and pushes (which repairs a torn layout).
        self.caveat = ""
        self._shards: dict[str, bytes] = {}  # digest of a fetched, checked stored value -> its shard file
        self._stored: dict[str, str] = {}  # shard key -> digest of the value stored, as last read or written
        # shard key -> (digest of a shard file, digest of its encoded value) for the files this port last
        # encoded or decoded: a write whose shard file is that one, while that value is stored, encodes nothing
        self._encoded: dict[str, tuple[bytes, str]] = {}
        self._plain_meta_digest = ""  # digest of the plain metadata value as last read
        self._last_layout = ""  # "sharded" or "plain": which layout the last read took the state from
        self._torn: tuple[tuple[str, ...], float] | None = None
        self.mismatch_grace_s = 5.0
        self.log = get_logger(obj=obj, key=key)

    def _source(self, key: str) -> str:
        return f"opensvc {self.obj} key {key}"

    async def read(self) -> tuple[SharedData | None, bytes | None]:
        self.caveat = ""
        manifest_value = await self.client.get_key(self.obj, self.manifest_key)
        plain_meta = await self.client.get_key(self.obj, self.meta_key)
        self._plain_meta_digest = digest(plain_meta.strip()) if plain_meta and plain_meta.strip() else ""
        manifest = self._parse_manifest(manifest_value) if manifest_value and manifest_value.strip() else None
        if manifest is None or self._plain_is_newer(manifest, plain_meta):
            return await self._read_plain(manifest, plain_meta)
        self._last_layout = "sharded"
        parts, torn = await self._read_shards(manifest)
        if torn:
            self._torn_for_long(torn)
            self.caveat = (
                f"{', '.join(torn)} not the one{'s' if len(torn) > 1 else ''} {self.manifest_key} lists for "
                f"{self.mismatch_grace_s:g} s (two nodes wrote at once): the shards as stored, additions only"
            )
        else:
            self._torn = None
        return SharedData(parts, vouched=not torn), bytes(manifest.meta)

    async def _read_plain(
        self, manifest: Manifest | None, plain_meta: bytes | None
    ) -> tuple[SharedData | None, bytes | None]:
        self._last_layout = "plain"
        self._torn = None
        self._stored = {}  # the shards may be older than the plain key: the next sharded write sends them all
        if manifest is not None and not _meta_fields(plain_meta).id:
            # written after the manifest by a sozud that does not read it: derived from an older state
            self.caveat = f"{self.key} was rewritten by a sozud that reads only the plain key: additions only"
        value = await self.client.get_key(self.obj, self.key)
        return (None if value is None else SharedData.plain(value)), plain_meta

    def _plain_is_newer(self, manifest: Manifest, plain_meta: bytes | None) -> bool:
        """Whether the plain key was written after the manifest (by a node writing the plain layout)."""
        if manifest.plain_meta is None:  # a manifest from before the field: compare generations
            return _meta_fields(plain_meta).generation > _meta_fields(bytes(manifest.meta)).generation
        return self._plain_meta_digest != manifest.plain_meta

    async def _read_shards(self, manifest: Manifest) -> tuple[tuple[tuple[str, bytes], ...], list[str]]:
        """The manifest's shards (fetched unless checked before) as (digest of the stored value, shard
        file), and the keys of those whose stored value is not the one listed. A mismatched shard is taken
        as stored (it is a shard another write left)."""
        files: list[tuple[str, bytes]] = []
        torn: list[str] = []
        stored: dict[str, str] = {}
        for ref in manifest.shards:
            cached = self._shards.get(ref.digest)
            actual = ref.digest
            if cached is None:
                value = await self.client.get_key(self.obj, ref.key)
                if value is None:  # the object was replaced by one written before this shard existed
                    actual, cached = "absent", b""
                else:
                    actual = digest(value)
                    source = f"{self._source(self.key)} ({ref.key})"
                    cached = decode_shard(value, source=source, max_bytes=self.max_state_bytes)
                    self._shards[actual] = cached
                    self._encoded[ref.key] = (_file_id(cached), actual)
                if actual != ref.digest:
                    torn.append(ref.key)
            stored[ref.key] = actual
            files.append((actual, cached))
        self._stored = stored
        listed = set(stored.values())
        for d in [d for d in self._shards if d not in listed]:
            del self._shards[d]
        return tuple(files), torn

    def _torn_for_long(self, torn: list[str]) -> None:
        """A torn layout is first a write in progress (nothing done, the next sync reads again); only when
        the same shards stay mismatched for ``mismatch_grace_s`` is it handled as stored."""
        now = time.monotonic()
        key = tuple(torn)
        if self._torn is None or self._torn[0] != key:
            self._torn = (key, now)
        if now - self._torn[1] < self.mismatch_grace_s:
            raise SharedInFlightError(
                f"{self._source(torn[0])} is not the one {self.manifest_key} lists (a write in progress?); "
                "nothing was applied or pushed, the next sync reads them again"
            )

    async def write(self, state: bytes, meta: bytes) -> None:
        if not self.sharded:
            await self.client.put_key(self.obj, self.key, state)
            await self.client.put_key(self.obj, self.meta_key, meta)
            self._plain_meta_digest = digest(meta.strip())
        else:
            await self._write_sharded(state, meta)
        self.writes += 1
        # v2 replicates an API write at its monitor's next loop (10-15 s): ask for it now (never fails).
        await self.client.wake_monitor(self.obj, "sozud wrote the shared sozu state")

    async def _write_sharded(self, state: bytes, meta: bytes) -> None:
        # the policy on values (no private key in a cfg object) applies to the state, not to its
        # compressed shards, which would hide the keys from the check
        self.client.check_value(self.obj, self.key, state)
        refs: list[ShardRef] = []
        previous = len(self._stored)  # 0 after a plain read or before any
        count = shard_count(state.count(b"\0"), previous)
        for i, data in enumerate(iter_shards(state, count)):
            key, file_id = f"{self.key}.s{i:02d}", _file_id(data)
            known = self._encoded.get(key)
            if known is not None and known[0] == file_id and self._stored.get(key) == known[1]:
                # the very file whose encoding is stored: nothing to compress, nothing to send
                refs.append(ShardRef(key=key, digest=known[1], records=data.count(b"\0")))
                continue
            value = encode_shard(data)
            ref = ShardRef(key=key, digest=digest(value), records=data.count(b"\0"))
            self._encoded[key] = (file_id, ref.digest)
            if self._stored.get(ref.key) != ref.digest:
                await self.client.put_key(self.obj, ref.key, value)
                self.bytes_written += len(value)
                # not cached: the next read fetches it and checks that it is still the one stored
                self._stored[ref.key] = ref.digest
            refs.append(ref)
        manifest = Manifest(shards=refs, meta=msgspec.Raw(meta.strip()), plain_meta=self._plain_meta_digest)
        encoded = msgspec.json.encode(manifest) + b"\n"
        await self.client.put_key(self.obj, self.manifest_key, encoded)
        self.bytes_written += len(encoded)
        listed = {ref.key for ref in refs}
        stale = sorted(k for k in self._stored if k not in listed)
        if stale:
            # fewer shards than before: the ones no manifest lists any more keep no old records (the agent
            # carries every key of the object); a reader of the previous manifest takes them for a write
            # in progress and reads again
            empty = encode_shard(b"")
            for key in stale:
                await self.client.put_key(self.obj, key, empty)
                self.bytes_written += len(empty)
                del self._stored[key]
                self._encoded.pop(key, None)
        if previous and previous != count:
            self.log.info("shared.resharded", shards=count, previous_shards=previous, blanked=len(stale))
        if self._last_layout == "plain":
            self.log.info("shared.migrated", layout="sharded", shards=len(refs), plain_key_kept=self.key)
            self._last_layout = "sharded"

    def _parse_manifest(self, value: bytes) -> Manifest:
        try:
            manifest = msgspec.json.decode(value, type=Manifest)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError) as e:
            reason = f"{self.manifest_key} is not a manifest: {e}"
            raise StateParseError(reason, source=self._source(self.key)) from None
        if manifest.format != LAYOUT_FORMAT or not manifest.shards or len(manifest.shards) > 4096:
            raise StateParseError(
                f"manifest format {manifest.format} with {len(manifest.shards)} shards is not one this sozud reads",
                source=self._source(self.key),
            )
        prefix = f"{self.key}.s"
        for ref in manifest.shards:
            if not ref.key.startswith(prefix):
                raise StateParseError(
                    f"shard key {ref.key!r} outside {prefix}*", source=self._source(self.manifest_key)
                )
        return manifest


class _MetaFields(msgspec.Struct):
    """The two fields of sozud's metadata the layout looks at (any other field is ignored)."""

    generation: int = -1
    id: str = ""


def _meta_fields(meta: bytes | None) -> _MetaFields:
    """``meta``'s generation and push id; the defaults when it is absent or not such metadata."""
    if not meta:
        return _MetaFields()
    try:
        return msgspec.json.decode(meta, type=_MetaFields)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError):
        return _MetaFields()
