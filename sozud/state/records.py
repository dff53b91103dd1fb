"""Records already seen: a cache that makes a state file read or written again cost its new records
(issue 10). Used by :mod:`sozud.state.codec` (``parse_state_file(..., cache=)``, ``write_state_file(...,
cache=)``); one cache per source (the shared key, sozu's SaveState output, the base file).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import NamedTuple

from sozud.proto import command_pb2 as pb
from sozud.state.model import ConfigState, ObjKey
from sozud.versions import SozuVersion

_RECORD_ID = re.compile(rb'^\{"id":"[^"]*",')


class RecordCache:
    """The records of one source's last parse and last write, so that a state file differing from the
    previous one in a few records costs a few records to read or write, not the whole file.

    Parsing: the digest of each record's body (its bytes after ``"id"``: sozud and sozu renumber records)
    maps to what it decoded to (:class:`Seen`); a record that added one object is added again by its key,
    with the very bytes the last parse stored, so successive parses of a source, and the states derived
    from them, share the keys and values of the records they have in common.
    Writing: each request (an add request by its value's canonical bytes) maps to its JSON ``content``. Only the
    last call's records are kept, so memory follows the state's size. One cache per source: the shared
    key, sozu's SaveState output, the base file.

    ``peer``: another source's cache (the live reads' one, for the parts of the shared state). A record this
    cache's last parse did not see but the peer's last parse of the same version did is taken from the
    peer, so the two sources' states share that key and value instead of holding one each. The sources'
    bytes need not match: only records with the same body are shared.
    """

    def __init__(self, peer: RecordCache | None = None) -> None:
        self.peer = peer
        self.version: SozuVersion | None = None
        self._parsed: dict[bytes, Seen] = {}
        # add requests by their field then their value's canonical bytes (the states' own objects, whose
        # hash Python keeps: no key to build), other requests by their encoding (field ""), -> JSON content
        self._written: dict[str, dict[bytes, bytes]] = {}
        self.decoded = 0  # records decoded from JSON (the others were reused), for tests and benchmarks
        self.encoded = 0

    def _for(self, version: SozuVersion) -> None:
        if version != self.version:
            self.version = version
            self._parsed = {}
            self._written = {}

    def lookup(self) -> Callable[[bytes], Seen | None]:
        """What the last parse saw of a record body, else what the peer's last parse of the same version saw
        (None: neither). Call after :meth:`_for`."""
        own = self._parsed.get
        peer = self.peer
        if peer is None or peer.version != self.version or not peer._parsed:
            return own
        theirs = peer._parsed.get

        def either(body: bytes) -> Seen | None:
            seen = own(body)
            return seen if seen is not None else theirs(body)

        return either


class Seen(NamedTuple):
    """A record parsed before: for a record that added one object (every ``add_*``), that object's key and
    the canonical bytes the state stored; for any other record, its request (serialized)."""

    request: bytes = b""
    key: ObjKey | None = None
    raw: bytes | None = None


def digest16(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def body_digest(raw: bytes) -> bytes:
    m = _RECORD_ID.match(raw)
    return digest16(raw[m.end() :] if m else raw)


def seen_after(req: pb.Request, kind: str, state: ConfigState, *, added: ObjKey | None) -> Seen:
    """What the cache keeps of a record just applied to ``state``: ``added`` is the one object it added,
    if it added one."""
    if added is None or not kind.startswith("add_"):
        return Seen(req.SerializeToString(deterministic=True))
    return Seen(key=added, raw=state.raw(added))
