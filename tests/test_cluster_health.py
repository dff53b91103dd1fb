"""Sync health where OpenSVC operators look (issue 14): ``sozud status --check`` / ``--info`` for the app
resource, and ``sozud status --cluster`` from the agent's cluster data, on a simulated three-node cluster
with one node drifting. The simulated agent does not run app resources: the test runs each node's check,
as the agent's monitor would, and gives the agent its exit status and output line (``status_log``)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from sozud.main import main
from sozud.proto import command_pb2 as pb
from sozud.testing import builders as build
from sozud.testing._sozu_state import DispatchResult
from sozud.testing.cluster import SimCluster, SimNode, wait_until

RETCODES = {0: "up", 1: "down", 2: "warn"}  # the template's retcodes for app#sozud


async def _check(node: SimNode, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    rc = await asyncio.to_thread(main, ["status", *extra, "--state-dir", node.config.sync.state_dir])
    return rc, capsys.readouterr().out.strip()


async def test_status_check_info_and_cluster_with_one_node_drifting(capsys: pytest.CaptureFixture[str]) -> None:
    cluster = await SimCluster.create(["a", "b", "c"])
    try:
        a, c = cluster.node("a"), cluster.node("c")
        await a.request(pb.Request(add_http_listener=build.http_listener("127.0.0.1:18080")))
        await a.request(pb.Request(add_cluster=build.cluster("app")))
        await cluster.start()
        await wait_until(lambda: all(b'"app"' in n.live_file() for n in cluster.nodes), what="initial sync")
        # c's sozu refuses one cluster in its main state: c cannot take the shared state any more
        original = c.sozu.state.apply

        def refusing(req: pb.Request) -> DispatchResult:
            if req.WhichOneof("request_type") == "add_cluster" and req.add_cluster.cluster_id == "blocked":
                return DispatchResult(error="simulated refusal")
            return original(req)

        c.sozu.state.apply = refusing  # type: ignore[method-assign]
        await a.request(pb.Request(add_cluster=build.cluster("blocked")))
        await wait_until(lambda: all(b'"blocked"' in n.live_file() for n in cluster.nodes if n is not c), what="a, b")
        assert c.daemon is not None
        d = c.daemon
        await wait_until(lambda: d.status.last_error_type == "ConvergenceError", what="c to report its drift")

        lines = {}
        for n in cluster.nodes:
            rc, out = await _check(n, capsys, "--check")
            lines[n.name] = (rc, out)
            cluster.opensvc.set_resource_status(n.name, "igw/svc/sozu", "app#sozud", RETCODES[rc], [out])
        assert lines["a"][0] == 0 and lines["a"][1].startswith("in sync: generation")
        assert lines["b"][0] == 0
        assert lines["c"][0] == 2 and lines["c"][1].startswith("drifting:")

        rc, info = await _check(c, capsys, "--info")
        keys = dict(line.split(": ", 1) for line in info.splitlines())
        assert rc == 0 and keys["sozud_state"] == "drifting" and keys["shared_generation"].isdigit()

        api = f"unix://{a.agent.lsnr_sock}"
        rc = await asyncio.to_thread(
            main, ["status", "--cluster", "--api", api, "--state-dir", a.config.sync.state_dir]
        )
        out = capsys.readouterr().out
        print(out)  # the closing note quotes it
        rows = [line.split(None, 2) for line in out.strip().splitlines()]
        assert rc == 0 and [r[0] for r in rows] == ["a", "b", "c"]
        assert [r[1] for r in rows] == ["up", "up", "warn"] and rows[2][2].startswith("drifting:")
    finally:
        await cluster.stop()


async def test_check_says_down_when_sozud_is_not_running(
    tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = await asyncio.to_thread(main, ["status", "--check", "--state-dir", str(tmp_path)])
    assert rc == 1 and capsys.readouterr().out.startswith("down: no status")


# A status.json as the daemon wrote it before the Status struct (a dict, field by field), with this
# process's pid so that the check sees a running sozud.
OLD_STATUS = (
    '{"node":"node1","pid":%d,"started_at":1700000000.5,"last_sync_at":1700000100.25,'
    '"last_success_at":1700000100.25,"last_outcome":"in_sync","last_reason":"startup","last_error":null,'
    '"action":null,"last_error_type":null,"consecutive_failures":0,"drift":0,"base_generation":7,'
    '"shared_generation":7,"shared_origin":"node2","conflicts_total":1,'
    '"requests_total":{"add_cluster":2,"add_backend":3},"pushes_total":4,"socket":"/run/sozu/sozu.sock",'
    '"api":null,"object":"igw/sec/sozu","key":"state.json","sozu_version":"2.1.0"}'
)


def test_a_status_file_written_before_the_status_struct_is_read(
    tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(tmp_path, "status.json")
    with open(path, "w") as f:
        f.write(OLD_STATUS % os.getpid())
    assert main(["status", "--check", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "in sync: generation 7 applied, shared generation 7 (node2)"
    assert main(["status", "--json", "--state-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(OLD_STATUS % os.getpid())
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    table = dict(line.split("  ", 1) for line in capsys.readouterr().out.splitlines())
    assert table["requests sent"].strip() == "add_backend=3, add_cluster=2"
    assert table["opensvc"].strip() == "auto igw/sec/sozu key state.json"
    assert main(["status", "--info", "--state-dir", str(tmp_path)]) == 0
    assert "last_sync: 2023-11-14T22:15:00Z" in capsys.readouterr().out.splitlines()


def test_a_status_file_with_a_bad_field_names_the_file_and_the_field(
    tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(tmp_path, "status.json")
    with open(path, "w") as f:
        f.write(json.dumps({**json.loads(OLD_STATUS % os.getpid()), "drift": "many"}))
    assert main(["status", "--check", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert path in err and "$.drift" in err and "Traceback" not in err


def test_exit_codes_keep_their_values() -> None:
    from sozud.exitcodes import CheckCode, ExitCode

    assert {c.name: int(c) for c in ExitCode} == {"OK": 0, "ERROR": 1, "USAGE": 2, "UNSAFE": 3, "INTERRUPTED": 130}
    assert {int(c): RETCODES[int(c)] for c in CheckCode} == {0: "up", 1: "down", 2: "warn"}
    assert [c.name.lower() for c in CheckCode] == ["up", "down", "warn"]
