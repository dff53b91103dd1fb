"""Bytes written to OpenSVC, and agent time, per one-backend change: the sharded layout (sozud/layout.py)
next to the first layout (one plain state-file key), for 1k, 10k and 100k clusters (one backend and one
HTTP frontend each), in the same run.

Bytes are measured: each layout's writer runs against an in-memory agent that counts what it receives.
Agent time is MODELLED with the cost measured on a real v2.1 agent (sozud/testing/_fake_opensvc_cost.py,
REAL_V2: write time and a busy window proportional to the object's total size), since what costs the
agent is the whole object it rewrites after each write, not the bytes sent.

    uv run python bench/layout.py [--clusters 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sozud._om.base import OMSettings
from sozud._om.memory import MemoryTransport
from sozud.layout import OpenSVCShared
from sozud.om_api import OMClient
from sozud.state.codec import write_state_file
from sozud.testing import builders as build
from sozud.testing._fake_opensvc_cost import MB, REAL_V2

OBJ = "igw/sec/sozu"


def state_file(clusters: int, weight: int) -> bytes:
    return write_state_file(build.fleet_state(clusters, changed_weight=weight))


def object_bytes(transport: MemoryTransport) -> int:
    return sum(len(k) + len(v) for k, v in transport.objects[OBJ].items())


async def measure(port_kind: str, before: bytes, after: bytes) -> tuple[int, float, int]:
    """(bytes written for the change, modelled agent seconds for the sync's writes, object size)."""
    transport = MemoryTransport(carries_text=True)
    transport.create_object(OBJ)
    client = OMClient(transport, OMSettings(retry_attempts=1))
    sharded = port_kind != "plain"
    port = OpenSVCShared(client, OBJ, "state.json", "state.json.meta", max_state_bytes=1 << 30, sharded=sharded)
    await port.write(before, b'{"generation":1}\n')
    mark = len(transport.writes)
    await port.write(after, b'{"generation":2}\n')
    written = transport.writes[mark:]
    size = object_bytes(transport)
    # each write makes the agent rewrite the whole object; then a busy window slows the next requests
    agent_s = len(written) * REAL_V2.write_s_per_mb * size / MB + REAL_V2.busy_s_per_mb * size / MB
    return sum(len(v) for _, _, v in written), agent_s, size


async def run(sizes: list[int]) -> None:
    heads = ["clusters", "state MB", "plain: bytes/change", "sharded: bytes/change", "ratio"]
    heads += ["plain: agent s/sync", "sharded: agent s/sync", "object MB plain/sharded"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in heads) + "|")
    for n in sizes:
        t0 = time.perf_counter()
        before, after = state_file(n, 100), state_file(n, 7)
        plain = await measure("plain", before, after)
        sharded = await measure("sharded", before, after)
        cells = [f"{n:>8}", f"{len(before) / MB:>8.1f}", f"{plain[0]:>19,}", f"{sharded[0]:>21,}"]
        cells += [f"{plain[0] / sharded[0]:>4.0f}x", f"{plain[1]:>19.2f}", f"{sharded[1]:>21.2f}"]
        cells += [f"{plain[2] / MB:>10.1f} / {sharded[2] / MB:>10.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
        del before, after
        print(f"  ({n} clusters measured in {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    print("\nagent s/sync: REAL_V2 model (0.2 s per MB of the object per write, then a 1 s/MB busy window).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", default="1000,10000,100000")
    args = parser.parse_args()
    asyncio.run(run([int(x) for x in args.clusters.split(",")]))


if __name__ == "__main__":
    main()
