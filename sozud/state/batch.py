"""Batch mode of ``apply_plan``: the plan's requests as state-file chunks sent with ``load_state``.

Used with a shared directory, for a plan of at least ``batch_threshold`` steps: the plan's requests,
in order, are written as state files (``WorkerRequest`` JSON records, ``\\n\\0``) and sent as
one ``load_state`` per chunk. ``load_state`` skips silently the records the main state refuses and
reports worker failures only as counts, so the live state is read and planned again afterwards and
what remains is sent one request at a time, where every failure is attributed to its request.
Worker-side failures inside a chunk stay attributed to the chunk (its ``load_state`` message).

Chunk size. ``load_state`` queues, for every worker, one main→worker message per record applied; the
queue is capped by sozu's ``max_command_buffer_size`` (default 2 000 000 bytes) and an overflow makes
sozu kill its workers and never answer (§11.10). Chunks are cut on the size of *our JSON records*,
which is larger than what sozu queues: 1.x/2.x send protobuf to workers (the fixtures' 10 000-object
file is 3.2 MB of JSON and fits the 2 MB default), 0.15 sends the same JSON plus a short id. The
default ``chunk_bytes`` of 400 000 keeps a chunk at or below a fifth of the default cap. Chunks are also
cut on what they queue per worker (``QUEUE_BUDGET_BYTES``, 65 536: the protobuf ``WorkerRequest`` plus its
8-byte length for 1.x/2.x, the JSON record for 0.15), 40% of the 163 840-byte cap of the published
OpenSVC template's ``config.toml``: with that cap a 400 000-byte chunk queued up to ~123 000 bytes on
2.x and ~400 000 on 0.15, and a 10 000-object file in one piece is never answered.
A record above ``MAX_RECORD_BYTES`` (``load_state`` reads through a 200 000-byte buffer, §3.8) is never
batched: it is sent on its own.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence

from sozud import serde
from sozud.errors import SozuRequestError, SozuTimeoutError, StateError
from sozud.log import get_logger
from sozud.proto import command_pb2 as pb
from sozud.redact import redact_text
from sozud.state.apply_report import ApplyReport, BatchResult
from sozud.state.live import SozuRequester
from sozud.state.plan import PlanStep
from sozud.versions import Family, SozuVersion

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LOAD_STATE_TIMEOUT_S",
    "MAX_RECORD_BYTES",
    "QUEUE_BUDGET_BYTES",
    "batch_chunks",
    "encode_records",
    "send_batches",
]

DEFAULT_CHUNK_BYTES = 400_000
MAX_RECORD_BYTES = 190_000  # load_state's 200 000-byte read buffer, minus a margin
# What one chunk may queue to each worker: 40% of the 163 840-byte max_command_buffer_size that the
# published OpenSVC template's config.toml sets (§11.10), so chunks fit that cap as well as the default.
QUEUE_BUDGET_BYTES = 65_536
DEFAULT_LOAD_STATE_TIMEOUT_S = 120.0  # sozu has no timeout of its own for load_state


def encode_records(requests: Sequence[pb.Request], version: SozuVersion) -> list[bytes]:
    """Each request as one state-file record: compact ``WorkerRequest`` JSON followed by ``\\n\\0``."""
    out = []
    for i, req in enumerate(requests):
        record = {"id": f"SOZUD-{i}", "content": serde.to_json(req, version)}
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        out.append(text.encode("utf-8") + b"\n\0")
    return out


def batch_chunks(
    requests: Sequence[pb.Request],
    version: SozuVersion,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    queue_budget: int = QUEUE_BUDGET_BYTES,
) -> list[tuple[int, list[bytes]]]:
    """The state-file chunks batch mode sends, cut on both the file size and what each queues to a worker."""
    records = encode_records(requests, version)
    if version.family is Family.V0_15:
        queued = [len(r) for r in records]  # 0.15 forwards the JSON record
    else:  # 1.x/2.x forward a length-prefixed protobuf WorkerRequest
        queued = [
            len(pb.WorkerRequest(id=f"SOZUD-{i}", content=req).SerializeToString()) + 8
            for i, req in enumerate(requests)
        ]
    return _chunks(records, chunk_bytes, queued, queue_budget)


def _chunks(
    records: Sequence[bytes],
    chunk_bytes: int,
    queued: Sequence[int] | None = None,
    queue_budget: int | None = None,
) -> list[tuple[int, list[bytes]]]:
    """Consecutive runs of records, each at most ``chunk_bytes`` (a lone bigger record is left out) and,
    with ``queued`` (per-record bytes queued to a worker), at most ``queue_budget`` queued bytes."""
    chunks: list[tuple[int, list[bytes]]] = []
    current: list[bytes] = []
    start, size, load = 0, 0, 0
    for i, rec in enumerate(records):
        q = queued[i] if queued is not None else 0
        if len(rec) > MAX_RECORD_BYTES or len(rec) > chunk_bytes:
            # never batched: close the current chunk; the record goes one by one after the batches
            if current:
                chunks.append((start, current))
            start, current, size, load = i + 1, [], 0, 0
            continue
        over_budget = queue_budget is not None and load + q > queue_budget
        if current and (size + len(rec) > chunk_bytes or over_budget):
            chunks.append((start, current))
            start, current, size, load = i, [], 0, 0
        current.append(rec)
        size += len(rec)
        load += q
    if current:
        chunks.append((start, current))
    return chunks


async def send_batches(
    cch: SozuRequester,
    steps: Sequence[PlanStep],
    shared_dir: str,
    sozu_dir: str,
    chunk_bytes: int,
    load_state_timeout_s: float,
    report: ApplyReport,
) -> None:
    version = cch.version
    if version is None:
        raise StateError("apply_plan: the channel's sozu version is unknown (connect first)")
    log = get_logger()
    for index, (first, chunk) in enumerate(batch_chunks([s.request for s in steps], version, chunk_bytes)):
        name = f".sozud-apply-{os.getpid()}-{secrets.token_hex(8)}-{index}.state"
        local_path = os.path.join(shared_dir, name)
        sozu_path = os.path.join(sozu_dir, name)
        data = b"".join(chunk)
        try:
            # private (certificates carry keys), created exclusively under a random name
            fd = os.open(local_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            report.notes.append(f"batch mode abandoned: cannot write {local_path}: {e}")
            log.warning("sozu.apply_batch_unwritable", path=local_path, error=str(e))
            return
        try:
            ok, message = True, ""
            try:
                reply = await cch.request(pb.Request(load_state=sozu_path), timeout_s=load_state_timeout_s)
                message = str(reply.response.message)
            except SozuRequestError as e:
                ok, message = False, redact_text(e.sozu_message)
            except SozuTimeoutError as e:
                report.batches.append(
                    BatchResult(index, first, len(chunk), len(data), False, f"no answer in time ({e})")
                )
                log.warning(
                    "sozu.apply_batch_timeout",
                    chunk=index,
                    steps=len(chunk),
                    hint="sozu answers no load_state of this size when max_command_buffer_size is small (the "
                    "published template's 163840 overflows its worker channels): raise it to 2000000 in sozu's "
                    "config.toml; sozud goes on one request at a time",
                )
                return
        finally:
            try:
                os.unlink(local_path)
            except OSError as e:
                log.warning("sozu.apply_batch_cleanup_failed", path=local_path, error=str(e))
        report.batches.append(BatchResult(index, first, len(chunk), len(data), ok, message))
        log.info("sozu.apply_batch", chunk=index, steps=len(chunk), bytes=len(data), ok=ok, sozu_message=message)
