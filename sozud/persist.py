"""Files sozud keeps in its state directory, written atomically (temp file, fsync, rename, fsync dir).

- ``base.state``: the *base* state (the last shared state this node read from OpenSVC and found equal to
  its live sozu), as a sozu state file; ``base.meta.json`` beside it (generation, digest).
- ``status.json``: what ``sozud status`` shows (last sync, last error, drift, generations).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import msgspec

from sozud.errors import StateError, StateParseError
from sozud.state.codec import RecordCache, parse_state_file, write_state_file
from sozud.state.model import ConfigState
from sozud.versions import SozuVersion


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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


class BaseMeta(msgspec.Struct, kw_only=True):
    generation: int = 0
    shared_id: str = ""  # the id of the push this base was read from (sozud.sync.SharedMeta.id)
    digest: str = ""
    sozu_version: str = ""
    saved_at: float = 0.0


class BaseStore:
    """The persisted base state of this node."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.state_path = self.dir / "base.state"
        self.meta_path = self.dir / "base.meta.json"
        # The last base loaded or saved, kept while its files are unchanged (a large base is expensive to
        # parse at every sync): (state file identity, meta file identity, version, state, meta).
        self._cached: tuple[tuple[int, int, int], tuple[int, int, int], SozuVersion, ConfigState, BaseMeta] | None = (
            None
        )
        self._records = RecordCache()  # the base's records last written or parsed

    def _identity(self, path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self, version: SozuVersion) -> tuple[ConfigState, BaseMeta] | None:
        """The base, or None when there is none yet (first start). A corrupt base is an error.

        The returned state is shared with the cache: callers must not modify it.
        """
        ident, meta_ident = self._identity(self.state_path), self._identity(self.meta_path)
        c = self._cached
        if c is not None and ident is not None and (c[0], c[1], c[2]) == (ident, meta_ident, version):
            return c[3], msgspec.structs.replace(c[4])
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read base state {self.state_path}: {e}") from None
        try:
            meta = msgspec.json.decode(self.meta_path.read_bytes(), type=BaseMeta)
        except FileNotFoundError:
            meta = BaseMeta()
        except (OSError, msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read base metadata {self.meta_path}: {e}") from None
        state = (
            parse_state_file(data, version, source=str(self.state_path), cache=self._records)
            if data
            else ConfigState(version)
        )
        if meta.digest and meta.digest != state.digest():
            raise StateParseError(
                "content does not match the digest recorded when it was saved (damaged?)",
                source=str(self.state_path),
            )
        if ident is not None and meta_ident is not None:
            self._cached = (ident, meta_ident, version, state, msgspec.structs.replace(meta))
        return state, meta

    def save(self, state: ConfigState, meta: BaseMeta, *, data: bytes | None = None, digest: str | None = None) -> None:
        """Persist ``state`` as the base. ``data`` / ``digest``: a state file of ``state`` and its
        :meth:`ConfigState.digest`, when the caller already has them (the shared state it read)."""
        meta.digest = digest or state.digest()
        # The meta is written first: a crash between the two leaves a digest mismatch, which load()
        # reports instead of silently using a base that does not match its metadata.
        atomic_write(self.meta_path, msgspec.json.encode(meta))
        atomic_write(self.state_path, data if data is not None else write_state_file(state, cache=self._records))
        ident, meta_ident = self._identity(self.state_path), self._identity(self.meta_path)
        if ident is not None and meta_ident is not None:
            self._cached = (ident, meta_ident, state.version, state, msgspec.structs.replace(meta))

    def set_aside(self) -> str | None:
        """Rename an unusable base (``base.state`` and its meta) to ``*.damaged`` so that it can be
        inspected and is not read again; the path it was kept as, or None when nothing could be moved."""
        self._cached = None
        kept: str | None = None
        for p in (self.state_path, self.meta_path):
            target = p.with_name(p.name + ".damaged")
            with contextlib.suppress(OSError):
                os.replace(p, target)
                if p == self.state_path:
                    kept = str(target)
        return kept

    def clear(self) -> None:
        self._cached = None
        for p in (self.state_path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


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
