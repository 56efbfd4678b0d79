#!/usr/bin/env bash
# FP4 kernels on a CUDA GPU: the GPU + interpreted kernel tests, then `fp4kv bench kernels`.
#
#   scripts/gpu_kernels.sh [OUT_DIR]      # default OUT_DIR: docs (bench_kernels.json / .png)
#
# Runs from any directory; uses this checkout (PYTHONPATH), so the package need not be installed.
# FlashInfer is measured and cross-checked when `import flashinfer` works. Exits non-zero if the
# tests or the benchmark failed (both always run).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernels_triton.py || status=$?
python3 -c 'import sys; from fp4kv_cli.cli import main; sys.argv = ["fp4kv", *sys.argv[1:]]; main()' \
  bench kernels --out "$out" || status=$?
exit "$status"
