#!/usr/bin/env bash
# Issue 20, item 3 on the 2-GPU machine (nvidia-h200-x2): the same GSM8K eval of Qwen2.5-Coder-1.5B
# (bf16 and nvfp4 + K centering, calibrated scales) on one GPU and data-parallel over both
# (torchrun, one process per GPU), then the two run folders compared. Needs the bf16 folder
# /tmp/q15 (scripts/gpu/eval_h200.sh prep). --batch-size is fixed, as identity needs (an automatic
# batch follows each GPU's free memory); 165 cuts the 1319 questions into 8 batches, 4 per GPU.
#   scripts/gpu/dp_h200x2.sh       # prints per format rows / identical rows, the wall seconds of
#                                  # both runs and their ratio (the speed-up), IDENTICAL or DIFFERENT
# Results under /tmp/res-dp, copied to $OUT/res-dp.tgz. A CPU try at tiny size: MODEL=<tiny folder>
# SCALES= EXTRA="--device cpu --limit 7 --batch-size 2 --max-new-tokens 8" scripts/gpu/dp_h200x2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
res=/tmp/res-dp
mkdir -p $res
save() { [ -n "${OUT:-}" ] && tar czf "$OUT/res-dp.tgz" -C $res . || true; }
trap save EXIT
scales=${SCALES-docs/runs/q15.ck.scales.json}
args=(eval gsm8k --model "${MODEL:-/tmp/q15}" ${scales:+--scales "$scales"} --kv-dtype bf16,nvfp4
      --batch-size 165 --fidelity-samples 32 --out $res ${EXTRA:-})
nvidia-smi --query-gpu=index,name,memory.used --format=csv || true
rm -rf $res/one-gpu $res/two-gpu
CUDA_VISIBLE_DEVICES=0 python3 -m fp4kv_cli "${args[@]}" --run-name one-gpu 2>&1 | tee $res/one-gpu.log
python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m fp4kv_cli "${args[@]}" --run-name two-gpu \
  2>&1 | tee $res/two-gpu.log
python3 scripts/compare_run_folders.py $res/one-gpu $res/two-gpu --out $res/comparison.json | tee $res/comparison.txt
