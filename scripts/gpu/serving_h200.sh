#!/usr/bin/env bash
# The serving figures of docs/serving.md on the GPU machine (H200, vLLM 0.26.0 offline wheel set),
# Qwen2.5-Coder-1.5B, every GSM8K test question. Pieces carried beforehand into /tmp/m:
# the GGUF (q15.*), the vLLM wheel set as a tar (vllm.*) and the gguf wheel.
#   scripts/gpu/serving_h200.sh prep      # join + check + convert the model; install vLLM and fp4kv's entry point
#   scripts/gpu/serving_h200.sh exports   # plain and centered fp8 checkpoints, inspect, the plugin check
#   scripts/gpu/serving_h200.sh vllm      # vLLM bf16 / fp8 plain / fp8 + plugin (compiled, CUDA graphs)
#   scripts/gpu/serving_h200.sh fp4kv     # fp4kv's own cache with the same scales files
# Results under results/ (and $OUT/ when set).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site_v:/tmp/site_ep:/tmp/site:$PWD PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_DISABLE_COMPILE_CACHE=1
q15=/tmp/q15 sum=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
out=${OUT:-results}
fp4kv() { python3 -m fp4kv_cli "$@"; }
case "${1:?stage}" in
  prep)
    cat /tmp/m/q15.* > /tmp/q15.gguf && echo "$sum  /tmp/q15.gguf" | sha256sum -c -
    mkdir -p /tmp/w && cat /tmp/m/vllm.* | tar xf - -C /tmp/w
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_v /tmp/w/*.whl
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/m/*.whl
    # fp4kv runs from this checkout; vLLM finds its plugin through the entry point metadata
    ep=/tmp/site_ep/fp4kv-0.0.0.dist-info; mkdir -p $ep
    printf 'Metadata-Version: 2.1\nName: fp4kv\nVersion: 0.0.0\n' > $ep/METADATA
    printf '[vllm.general_plugins]\nfp4kv_k_centering = fp4kv_cli.serve.vllm_plugin:register\n' > $ep/entry_points.txt
    python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
    fp4kv convert /tmp/q15.gguf --out $q15 && rm /tmp/q15.gguf ;;
  exports)
    fp4kv export-scales docs/runs/q15.scales.json -m $q15 -o /tmp/q15-fp8 --kv-dtype fp8 \
      --format compressed-tensors --engine vllm --target sm90
    fp4kv export-scales docs/runs/q15.ck.scales.json -m $q15 -o /tmp/q15-fp8-ck --kv-dtype fp8 \
      --format compressed-tensors --engine vllm --target sm90 --k-centering plugin
    fp4kv inspect /tmp/q15-fp8-ck || echo "inspect exit $?"
    python3 scripts/check_vllm_plugin.py --reference $q15 --plain /tmp/q15-fp8 --centered /tmp/q15-fp8-ck \
      --questions 4 --out "$out/check_vllm_plugin_q15.json" ;;
  vllm)
    fp4kv eval gsm8k --engine vllm -m $q15 --vllm-kv-dtype auto --batch-size 1319 --out "$out" --run-name q15-vllm-bf16
    fp4kv eval gsm8k --engine vllm -m /tmp/q15-fp8 --vllm-kv-dtype fp8 --batch-size 1319 --out "$out" \
      --run-name q15-vllm-fp8 --paired-with "$out/q15-vllm-bf16"
    fp4kv eval gsm8k --engine vllm -m /tmp/q15-fp8-ck --vllm-kv-dtype fp8 --batch-size 1319 --out "$out" \
      --run-name q15-vllm-fp8-ck --paired-with "$out/q15-vllm-bf16" --paired-with "$out/q15-vllm-fp8" ;;
  fp4kv)
    fp4kv eval gsm8k -m $q15 --kv-dtype bf16,fp8 --scales docs/runs/q15.ck.scales.json --batch-size 128 \
      --no-fidelity --out "$out" --run-name q15-fp4kv-ck
    fp4kv eval gsm8k -m $q15 --kv-dtype fp8 --scales docs/runs/q15.scales.json --batch-size 128 \
      --no-fidelity --out "$out" --run-name q15-fp4kv-plain ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
