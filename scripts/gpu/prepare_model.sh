#!/usr/bin/env bash
# On the GPU machine: join a GGUF carried in pieces, check its sha256, install carried wheels,
# and convert it once to a bf16 folder (later commands load that in seconds).
#   scripts/gpu/prepare_model.sh PIECES_GLOB SHA256 OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
pieces="$1"; sum="$2"; out="$3"
if [ ! -d "$out" ]; then
  gguf="/tmp/$(basename "$out").gguf"
  cat $pieces > "$gguf"
  echo "$sum  $gguf" | sha256sum -c -
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/wheels/*.whl
  PYTHONPATH=/tmp/site:$PWD python3 -m fp4kv_cli convert "$gguf" --out "$out"
  rm -f "$gguf"
fi
ls "$out"
