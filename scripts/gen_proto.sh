#!/usr/bin/env bash
# Regenerates sozud/proto/command_pb2.py (+ .pyi type stubs) from sozud/proto/command.proto with the
# official protobuf compiler bundled in grpcio-tools (a dev dependency, pinned in uv.lock).
# Usage: scripts/gen_proto.sh [OUTPUT_DIR]   (default: sozud/proto; the staleness test passes a temp dir)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$here/sozud/proto"}
mkdir -p "$out"
cd "$here/sozud/proto"
python -m grpc_tools.protoc -I. --python_out="$out" --mypy_out="$out" command.proto
