"""Files sozud keeps in its state directory, written atomically (temp file, fsync, rename, fsync dir).

- ``base.meta.json``: the *base*'s metadata (generation, push id, digest, and ``parts``: the layout). The
  base is the last shared state this node read from OpenSVC and found equal to its live sozu, kept as either
  - ``base.state``: one sozu state file (``parts`` empty), or
  - ``base.parts/<id>``: the state in parts, each a sozu state file of some of the records, named by a
    content id (a part's bytes never change under its name); the meta lists the ids in order, and the
    parts concatenated are the state.
- ``status.json``: what ``sozud status`` shows (last sync, last error, drift, generations).
- ``*.damaged`` (``base.state.damaged``, ``base.parts.damaged``, ``base.meta.json.damaged``): a base that
  could not be read, set aside for inspection.

Crash safety (the process may die between any two file operations): :meth:`BaseStore.load` returns the
base saved last, the one before it, or raises a :class:`~sozud.errors.StateError` (files that do not
match their meta); never a mix. Parts are written first under new names (content-addressed, never
overwritten), then the meta that names them (an atomic rename: the switch), and only then are the files
it no longer names deleted. A single-file save writes the meta first and the state second (a crash between
them is a digest mismatch, which ``load`` reports); when the base it replaces is in parts, the state file
is written first, unread until the meta names it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec

from sozud.errors import StateError, StateParseError
from sozud.state.codec import RecordCache, parse_state_file, write_state_file
from sozud.state.model import ConfigState
from sozud.versions import SozuVersion

# A part's id is its file name in ``base.parts``: nothing that could be a path (no separator, no dot).
_PART_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def check_state_dir(state_dir: str | Path) -> None:
    """Fail at start, naming the setting, when sozud could not keep its base and status in ``state_dir``."""
    from sozud.errors import ConfigError

    path = Path(state_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sozud-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"configuration key 'sync.state_dir': cannot write in {path}: {e.strerror or e}", key="sync.state_dir"
        ) from None


def _delete(path: Path) -> None:
    """Remove the file ``path`` (already gone is fine): a file the base no longer names."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class BaseMeta(msgspec.Struct, kw_only=True):
    generation: int = 0
    shared_id: str = ""  # the id of the push this base was read from (sozud.sync.SharedMeta.id)
    digest: str = ""
    sozu_version: str = ""
    saved_at: float = 0.0
    # the ids of the base's parts (files in base.parts), in order; empty: the base is the file base.state
    parts: list[str] = []


_Identity = tuple[int, int, int]


class _Cached(NamedTuple):
    """The last base loaded or saved, valid while its files keep their identities."""

    meta_ident: _Identity
    paths: tuple[Path, ...]  # the files holding the state: base.state, or the parts in order
    idents: tuple[_Identity | None, ...]
    version: SozuVersion
    state: ConfigState
    meta: BaseMeta


def _copy(meta: BaseMeta) -> BaseMeta:
    return msgspec.structs.replace(meta, parts=list(meta.parts))


class BaseStore:
    """The persisted base state of this node (see the module docstring for its files and crash safety)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.state_path = self.dir / "base.state"
        self.meta_path = self.dir / "base.meta.json"
        self.parts_dir = self.dir / "base.parts"
        # kept while its files are unchanged (a large base is expensive to parse at every sync)
        self._cached: _Cached | None = None
        self._records = RecordCache()  # the base's records last written or parsed
        self._part_paths: dict[str, Path] = {}  # part id -> its file, for the ids checked (a base has hundreds)

    def _identity(self, path: Path) -> _Identity | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _part_path(self, part_id: str, *, source: Path | None = None) -> Path:
        """The file of part ``part_id``; an id that is not a plain file name is refused (from ``source``,
        a meta file: a StateParseError naming it)."""
        path = self._part_paths.get(part_id)
        if path is not None:
            return path
        if not _PART_ID.fullmatch(part_id):
            reason = f"part id {part_id!r} is not a safe file name (1-128 of [0-9A-Za-z_-])"
            if source is not None:
                raise StateParseError(reason, source=str(source), path="parts")
            raise StateError(f"cannot save the base in {self.parts_dir}: {reason}")
        path = self._part_paths[part_id] = self.parts_dir / part_id
        return path

    def _remember(
        self,
        paths: tuple[Path, ...],
        version: SozuVersion,
        state: ConfigState,
        meta: BaseMeta,
        known: dict[Path, _Identity | None] | None = None,
    ) -> None:
        """Cache ``state`` as the base its files hold. ``known``: identities of files not written since they
        were last checked (a file changed behind our back then only misses the cache at the next load)."""
        meta_ident = self._identity(self.meta_path)
        known = known or {}
        idents = tuple(known[p] if p in known else self._identity(p) for p in paths)
        if meta_ident is not None and None not in idents:
            self._cached = _Cached(meta_ident, paths, idents, version, state, _copy(meta))

    def load(self, version: SozuVersion) -> tuple[ConfigState, BaseMeta] | None:
        """The base, or None when there is none yet (first start). A corrupt base is an error: a
        :class:`StateError` naming the file (a part missing, a record that does not parse, content that
        does not match the digest in the meta).

        The returned state is shared with the cache: callers must not modify it.
        """
        meta_ident = self._identity(self.meta_path)
        c = self._cached
        if (
            c is not None
            and (c.meta_ident, c.version) == (meta_ident, version)
            and c.idents == tuple(self._identity(p) for p in c.paths)
        ):
            return c.state, _copy(c.meta)
        meta: BaseMeta | None = None
        meta_error: StateError | None = None
        try:
            meta = msgspec.json.decode(self.meta_path.read_bytes(), type=BaseMeta)
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
            meta_error = StateError(f"cannot read base metadata {self.meta_path}: {e}")
        if meta is not None and meta.parts:
            paths = tuple(self._part_path(p, source=self.meta_path) for p in meta.parts)
            state = self._parse_parts(paths, version)
            source = f"{self.parts_dir} (the parts {self.meta_path.name} lists)"
        else:
            paths = (self.state_path,)
            try:
                data = self.state_path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise StateError(f"cannot read base state {self.state_path}: {e}") from None
            if meta_error is not None:
                raise meta_error from None
            meta = meta or BaseMeta()
            state = (
                parse_state_file(data, version, source=str(self.state_path), cache=self._records)
                if data
                else ConfigState(version)
            )
            source = str(self.state_path)
        if meta.digest and meta.digest != state.digest():
            raise StateParseError(
                "content does not match the digest recorded when it was saved (damaged?)", source=source
            )
        if meta_ident is not None:
            idents = tuple(self._identity(p) for p in paths)
            if None not in idents:
                self._cached = _Cached(meta_ident, paths, idents, version, state, _copy(meta))
        return state, meta

    def _parse_parts(self, paths: tuple[Path, ...], version: SozuVersion) -> ConfigState:
        """The parts' records, in order, as one state; an error names the part file and its record."""
        files: list[bytes] = []
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise StateParseError(
                    f"part file missing (listed in {self.meta_path.name})", source=str(path)
                ) from None
            except OSError as e:
                raise StateError(f"cannot read base part {path}: {e}") from None
            if data and not data.endswith(b"\0"):
                raise StateParseError(
                    "truncated last record: a part must end with a NUL", source=str(path), record=data.count(b"\0")
                )
            files.append(data)
        data = b"".join(files)
        if not data:
            return ConfigState(version)
        source = str(self.parts_dir)
        try:
            return parse_state_file(data, version, source=source, cache=self._records)
        except StateParseError as e:
            if e.record is None:
                raise
            raise _in_part(e, source, paths, files) from None

    def save(
        self,
        state: ConfigState,
        meta: BaseMeta,
        *,
        data: bytes | None = None,
        digest: str | None = None,
        parts: Sequence[tuple[str, bytes]] | None = None,
    ) -> None:
        """Persist ``state`` as the base. ``digest``: its :meth:`ConfigState.digest`, when the caller
        already has it (the shared state it read). ``data``: a state file of ``state``, kept as
        ``base.state``. ``parts`` (``data`` is then not used): ``state`` as (content id, state file) pairs,
        concatenated in order; only the parts not already on disk are written (a content id must change
        whenever its part's bytes do), then the meta; then the files it no longer names are deleted.
        ``meta.digest`` and ``meta.parts`` are set here."""
        meta.digest = digest or state.digest()
        if parts is not None and not parts:
            parts, data = None, b""  # no part: the empty state, as a file
        if parts is not None:
            self._save_parts(state, meta, parts)
            return
        meta.parts = []
        if self.parts_dir.exists():
            # The base being replaced may be in parts: base.state is not read until the meta names it,
            # and the parts stay its files until then.
            atomic_write(self.state_path, data if data is not None else write_state_file(state, cache=self._records))
            atomic_write(self.meta_path, msgspec.json.encode(meta))
            self._remove_parts_dir()
        else:
            # The meta is written first: a crash between the two leaves a digest mismatch, which load()
            # reports instead of silently using a base that does not match its metadata.
            atomic_write(self.meta_path, msgspec.json.encode(meta))
            atomic_write(self.state_path, data if data is not None else write_state_file(state, cache=self._records))
        self._remember((self.state_path,), state.version, state, meta)

    def _save_parts(self, state: ConfigState, meta: BaseMeta, parts: Sequence[tuple[str, bytes]]) -> None:
        paths = tuple(self._part_path(part_id) for part_id, _ in parts)
        self._part_paths = {part_id: path for (part_id, _), path in zip(parts, paths, strict=True)}
        by_id: dict[str, bytes] = {}
        for part_id, part in parts:  # an id listed twice (two empty parts) is one file
            if by_id.setdefault(part_id, part) is not part and by_id[part_id] != part:
                raise StateError(f"cannot save the base in {self.parts_dir}: part id {part_id} given two contents")
        try:
            present = set(os.listdir(self.parts_dir))
        except FileNotFoundError:
            present = set()
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.dir)  # the directory's entry is durable before a meta can name its files
        # 1. The parts not on disk yet. A name on disk already holds those bytes (ids are content ids),
        # and the parts the current meta lists are left as they are: it remains a complete base.
        c = self._cached
        known = dict(zip(c.paths, c.idents, strict=True)) if c is not None else {}
        for part_id, part in by_id.items():
            if part_id not in present:
                known.pop(self.parts_dir / part_id, None)
                atomic_write(self.parts_dir / part_id, part)
        # 2. The meta naming the new set: the switch (an atomic rename).
        meta.parts = [part_id for part_id, _ in parts]
        atomic_write(self.meta_path, msgspec.json.encode(meta))
        # 3. Only now what no base names any more (older parts, temporary files a crash left, the single
        # file). A failure here leaves files that the next save deletes; the base is saved.
        for stale in [*(self.parts_dir / name for name in sorted(present - set(meta.parts))), self.state_path]:
            with contextlib.suppress(OSError):
                _delete(stale)
        self._remember(paths, state.version, state, meta, known)

    def _remove_parts_dir(self) -> None:
        with contextlib.suppress(OSError):
            _remove_tree(self.parts_dir)

    def set_aside(self) -> str | None:
        """Rename an unusable base (``base.state``, ``base.parts`` and the meta) to ``*.damaged`` so that it
        can be inspected and is not read again (an earlier ``*.damaged`` is replaced); the paths it was
        kept as (the state file and/or the parts directory), or None when nothing could be moved."""
        self._cached = None
        kept: list[str] = []
        for p in (self.state_path, self.parts_dir, self.meta_path):
            target = p.with_name(p.name + ".damaged")
            try:
                if p == self.parts_dir and p.exists() and target.exists():
                    _remove_tree(target)
                os.replace(p, target)
            except OSError:
                continue
            if p != self.meta_path:
                kept.append(str(target))
        return ", ".join(kept) or None

    def clear(self) -> None:
        """Forget the base (the state first: a meta alone, or parts without a meta, are no base)."""
        self._cached = None
        for p in (self.state_path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if self.parts_dir.exists():
            self._remove_parts_dir()


def _remove_tree(path: Path) -> None:
    """Remove the directory ``path`` and the files in it (``base.parts`` or ``base.parts.damaged``)."""
    for name in os.listdir(path):
        _delete(path / name)
    path.rmdir()


def _in_part(e: StateParseError, source: str, paths: tuple[Path, ...], files: list[bytes]) -> StateParseError:
    """``e``, raised at record ``e.record`` of the parts concatenated, as an error naming the part file
    and the record's number in it."""
    assert e.record is not None
    where = source + f", record {e.record}" + (f", at {e.path}" if e.path else "")
    reason = str(e).removeprefix(where + ": ")
    first = 0
    for path, data in zip(paths, files, strict=True):
        count = data.count(b"\0")
        if e.record < first + count:
            return StateParseError(reason, source=str(path), record=e.record - first, path=e.path)
        first += count
    return e


class Status(msgspec.Struct, kw_only=True):
    """``status.json``: what the daemon last did. The daemon updates it after every sync and writes it;
    ``sozud status`` reads it. Field names are the file's keys (files written before this struct existed
    had the same keys and read as they are; a key missing from a file takes its default)."""

    node: str = ""
    pid: int = 0
    started_at: float = 0.0
    last_sync_at: float | None = None
    last_success_at: float | None = None
    last_outcome: str | None = None  # a SyncOutcome value, "<outcome>, with failures", or "failed"
    last_reason: str | None = None  # the triggers of the last sync, comma-separated
    last_error: str | None = None
    action: str | None = None  # what an operator must do about the last failure, when sozud cannot
    last_error_type: str | None = None
    consecutive_failures: int = 0
    drift: int | None = None
    base_generation: int | None = None
    shared_generation: int | None = None
    shared_origin: str | None = None
    conflicts_total: int = 0
    requests_total: dict[str, int] = msgspec.field(default_factory=dict)
    pushes_total: int = 0
    socket: str = ""
    api: str | None = None
    object: str = ""
    key: str = ""
    sozu_version: str | None = None


class StatusFile:
    """``status.json`` in the state directory (see :class:`Status`)."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / "status.json"

    def write(self, status: Status) -> None:
        atomic_write(self.path, msgspec.json.encode(status), mode=0o644)

    def read(self) -> Status | None:
        """The status, or None when there is none; a file that does not decode is a ``StateError``
        naming the file and the field."""
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=Status)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read status file {self.path}: {e}") from None
