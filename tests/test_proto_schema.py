"""The checked-in generated code matches sozud/proto/command.proto, and the schema has sozu's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sozud.proto import command_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_code_is_regenerated_identically(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(["bash", str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)], check=True, env=env)
    for name in ("command_pb2.py", "command_pb2.pyi"):
        fresh = (tmp_path / name).read_bytes()
        checked_in = (ROOT / "sozud/proto" / name).read_bytes()
        assert fresh == checked_in, f"sozud/proto/{name} is stale: run scripts/gen_proto.sh"


def number(message: type, field: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[field].number)  # type: ignore[attr-defined]


def test_field_numbers_from_the_protocol_document() -> None:
    # a sample across the catalogue (docs/sozu-command-protocol.md §4); the fixture tests decode every
    # captured frame with this schema, which checks the rest
    assert number(pb.Request, "add_cluster") == 13
    assert number(pb.Request, "query_clusters_hashes") == 37
    assert number(pb.Request, "remove_udp_frontend") == 59
    assert number(pb.AddBackend, "address") == 3
    assert number(pb.RequestHttpFrontend, "hsts") == 16
    assert number(pb.HttpsListenerConfig, "send_tls13_tickets") == 20
    assert number(pb.ResponseContent, "certificates_with_fingerprints") == 12
    assert number(pb.Uint128, "high") == 2


def test_declaration_order_is_sozus_json_key_order() -> None:
    names = [f.name for f in pb.CustomHttpAnswers.DESCRIPTOR.fields]
    assert names.index("answer_421") == names.index("answer_413") + 1 and names[-1] == "answer_429"
    https = [f.name for f in pb.HttpsListenerConfig.DESCRIPTOR.fields]
    assert https.index("h2_max_rst_stream_emitted_lifetime") == https.index("h2_max_rst_stream_abusive_lifetime") + 1
    assert https.index("strict_sni_binding") == https.index("h2_max_header_list_size") + 1
