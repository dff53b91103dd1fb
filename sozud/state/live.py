"""Reading the live configuration of a running sozu, and a cheap probe that says whether it changed.

Two ways to read (docs/sozu-command-protocol.md §7):

**With a shared directory** (``shared_dir``: a directory that sozu's main process can write and sozud
can read, e.g. ``/run/sozu``): one ``save_state`` to a fresh file there, parsed with the state-file
codec, then deleted. One request whatever the size, and exact: orphan backends (of removed clusters),
every certificate with its listener address, every listener setting.

**Without it**, with queries (``1 + 1 + N + 1 + 1 + 1`` requests for ``N`` clusters):

==================================  ================================================================
``list_listeners``                  every listener with its settings and ``active`` flag
``query_clusters_hashes``           the cluster ids (``"main"`` entry)
``query_cluster_by_id`` x N         each cluster's configuration and backends (``"main"`` entry)
``list_frontends`` (no filter)      every frontend, deny routes and frontends of removed clusters
                                    included (1.0.0-1.0.4 answer FAILURE: frontends then come from
                                    the per-cluster replies, and deny routes and frontends of removed
                                    clusters cannot be seen)
``query_certificates_from_the_state``  PEM, chain, key, names, keyed by fingerprint (no address)
``query_certificates_from_workers``    which HTTPS listener holds which fingerprint (sent only when
                                    the state holds certificates)
==================================  ================================================================

What the query path cannot see (:class:`LiveRead` says so, :meth:`LiveRead.hides` tells per object):

- backends whose cluster was removed (sozu lists backends only per existing cluster);
- the listener address of a certificate that no worker serves: certificates on an address without an
  HTTPS listener (the main state accepted them, the workers refused them) and certificates *shadowed*
  on a listener by another one for the same names (workers report only the certificate each name
  resolves to). They are reported in :attr:`LiveRead.unresolved_certificates`; a certificate served
  at one address and shadowed at another is seen at the first only;
- when one fingerprint is installed at several addresses with different keys or names, the state
  query returns one of them, used for every address;
- on 0.15 the certificates query returns the names derived from the certificate (CN and DNS SANs),
  not the stored list (0.15 stores what was sent, normally ``[]``, which is what its CLI sends):
  names equal to the derived ones are reported as ``[]``; certificates that 0.15 cannot parse (its
  main state accepts some) are left out of the query and cannot be seen;
- the read is not atomic: a change between two of its requests can give a mix. Take :func:`probe`
  *before* reading: such a change then shows in the next probe.

2.x closes the connection on a reply above ``max_command_buffer_size`` (2 MB by default): with many
certificates, the certificates query can exceed it; use a shared directory there. 0.15.19 never answers
a cluster query whose per-worker answer exceeds its worker message size (§12, e.g. 150 backends with a
16 kB ``command_buffer_size``): a timeout there may be that bug; a shared directory avoids the queries.

The save_state file: sozud creates it empty, mode 0600, under a random name (it will hold private keys;
nobody can plant a symlink at a random name), then asks sozu to write it; sozu truncates and writes in
place, so the mode stays. sozu must be able to write a file that sozud created (root, or the same user).
``shared_dir_sozu_path`` is the directory as sozu's main process sees it when that differs (container).
The file is deleted after parsing, also on errors.

The probe (:func:`probe`) costs one small request: ``count_requests`` (per-request-type counters of the
main state, bumped by every configuration request it dispatches, backends included, whichever client
sent it; never decreasing while sozu runs). It also carries the channel's connection epoch, so a sozu
restart (which resets the counters) reads as a change even when the counters happen to match. It does
not ask for ``query_clusters_hashes``: its reply grows with the cluster count, and 2.x closes the
connection on a reply above ``max_command_buffer_size`` (2 MB by default: about 80,000 clusters).

The counters also tell whether anything but our own requests reached sozu while we applied a plan
(:func:`counts_explained`): probe before the first request and after the last one; when, for every
counter, the increase is exactly the number of our requests of that type (sozu names a counter after
the request in CamelCase, :func:`counter_name`), nobody else changed sozu in between, and what sozu
holds is what our accepted requests made of the state read before. A counter that did not exist before
proves nothing: sozu starts a new counter at 1 or at 2 depending on its version (``or_insert(1)`` then
``+= 1`` in 2.x), so an increase there cannot be told from an operator's request of the same type. The
adapter (:class:`sozud.adapters.SozuAdapter`) uses this to keep its prediction of the state after an
apply instead of reading sozu again in full.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sozud.errors import StateError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.state.live_io import LiveRead, SozuRequester, ask, derived_names, version_of
from sozud.state.live_queries import ClusterReplies, read_by_queries
from sozud.state.model import ConfigState

if TYPE_CHECKING:
    from sozud.state.codec import RecordCache

__all__ = [
    "ClusterReplies",
    "Fingerprint",
    "LiveRead",
    "SozuRequester",
    "counter_name",
    "counts_explained",
    "derived_names",
    "probe",
    "read_live",
    "read_live_report",
]

# --- probe --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """A comparable summary of a live sozu: equal fingerprints mean nothing configured changed.

    ``epoch`` is the channel's connection counter (a reconnect may be a restart), ``request_counts``
    the main state's per-request-type counters.
    """

    epoch: int
    request_counts: tuple[tuple[str, int], ...]


async def probe(ch: SozuRequester) -> Fingerprint:
    """One small request; compare the result with the one taken before the last full read.

    It cannot miss a change: every configuration request the main state dispatches (backends
    included, which 2.x reports with no event) bumps a counter, counters never go down while sozu
    runs, and a restart changes the epoch. It can report a change that changed nothing (a refused
    request is counted on 1.x/2.x; a request that re-adds an identical object too). Its size does not
    grow with the state.
    """
    counts = await ask(ch, pb.Request(count_requests=pb.CountRequests()), "request_counts")
    # the epoch of the connection that answered (a request may reconnect first): counts and epoch agree
    return Fingerprint(epoch=ch.epoch, request_counts=tuple(sorted(counts.request_counts.map.items())))


def counter_name(kind: str) -> str:
    """sozu's ``count_requests`` name of a request type: the request's oneof field in CamelCase
    (``add_backend`` -> ``AddBackend``)."""
    return "".join(part[:1].upper() + part[1:] for part in kind.split("_"))


def counts_explained(before: Fingerprint, after: Fingerprint, sent: Mapping[str, int]) -> bool:
    """Whether the counters went from ``before`` to ``after`` by exactly the requests ``sent`` (request
    type, e.g. ``add_backend`` -> how many), on one connection: then no other configuration request
    reached sozu in between. False when a type we sent had no counter in ``before`` (its first value is
    ambiguous, see the module docstring)."""
    if before.epoch != after.epoch:
        return False
    was, now = dict(before.request_counts), dict(after.request_counts)
    ours: dict[str, int] = {}
    for kind, n in sent.items():
        if n:
            name = counter_name(kind)
            ours[name] = ours.get(name, 0) + n
    if any(name not in was for name in ours):
        return False
    return all(now.get(name, 0) - was.get(name, 0) == ours.get(name, 0) for name in was.keys() | now.keys())


# --- full read ----------------------------------------------------------------------------------------


async def read_live(
    ch: SozuRequester,
    *,
    shared_dir: str | None = None,
    shared_dir_sozu_path: str | None = None,
) -> ConfigState:
    """The live configuration of the sozu behind ``ch`` (see the module docstring for the method)."""
    return (await read_live_report(ch, shared_dir=shared_dir, shared_dir_sozu_path=shared_dir_sozu_path)).state


async def read_live_report(
    ch: SozuRequester,
    *,
    shared_dir: str | None = None,
    shared_dir_sozu_path: str | None = None,
    records: RecordCache | None = None,
    clusters: ClusterReplies | None = None,
) -> LiveRead:
    """Like :func:`read_live`, with how it was read and what could not be seen.

    ``shared_dir`` is the directory as sozud sees it; ``shared_dir_sozu_path`` the same directory as
    sozu's main process sees it (a container mount), default ``shared_dir``. ``records``: the SaveState
    records of the last read, so that this one decodes only the records that changed. ``clusters``: without
    a shared directory, the cluster replies of the last read, so that this one queries only the clusters
    whose hash changed (:mod:`sozud.state.live_queries`).
    """
    started = time.monotonic()
    if shared_dir is not None:
        read = await _read_by_save_state(ch, shared_dir, shared_dir_sozu_path or shared_dir, records)
    else:
        read = await read_by_queries(ch, clusters)
    read.duration_s = time.monotonic() - started
    get_logger().debug(
        "sozu.live_read",
        method=read.method,
        requests=read.requests,
        objects=len(read.state),
        unresolved_certificates=len(read.unresolved_certificates),
        duration_ms=round(read.duration_s * 1000, 2),
    )
    return read


async def _read_by_save_state(
    ch: SozuRequester, shared_dir: str, sozu_dir: str, records: RecordCache | None = None
) -> LiveRead:
    from sozud.state.codec import parse_state_file  # another module of the package, imported late

    version = version_of(ch)
    name = f".sozud-live-{os.getpid()}-{secrets.token_hex(8)}.state"
    local_path = os.path.join(shared_dir, name)
    sozu_path = os.path.join(sozu_dir, name)
    # The file holds private keys: create it ourselves, private, before sozu truncates and fills it in
    # place (sozu keeps the inode, so the mode stays). A random name: nobody can plant a symlink there.
    try:
        fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except OSError as e:
        raise StateError(f"cannot create the live-read file {local_path} in the shared directory: {e}") from e
    try:
        await ask(ch, pb.Request(save_state=sozu_path), None)
        try:
            box: list[bytes] = []  # not the thread's result: a finished future may outlive the read (GC)
            await asyncio.to_thread(_read_bytes, local_path, box)
            data = box.pop()
        except OSError as e:
            raise StateError(
                f"sozu saved its state to {sozu_path} but it cannot be read at {local_path}: {e} "
                "(is shared_dir the same directory as sozu's shared_dir_sozu_path?)"
            ) from e
        # sozu answered after writing the whole file: an empty file is an empty sozu, not a partial one
        # what sozu itself holds is read whatever its size: a plan can then remove it
        state = parse_state_file(
            data,
            version,
            source=f"save_state {sozu_path}",
            allow_empty=True,
            max_record_bytes=None,
            max_state_bytes=None,
            cache=records,
        )
    finally:
        try:
            os.unlink(local_path)
        except FileNotFoundError:
            pass
        except OSError as e:
            get_logger().warning("sozu.live_read_cleanup_failed", path=local_path, error=str(e))
    return LiveRead(state=state, method="save_state", requests=1)


def _read_bytes(path: str, box: list[bytes]) -> None:
    with open(path, "rb") as f:
        box.append(f.read())
