#!/usr/bin/env bash
# The evaluation figures of docs/longctx.md, docs/sampled.md and docs/models.md on the GPU machine
# (H200), Qwen2.5-Coder-1.5B. Pieces carried beforehand into /tmp/m: the GGUF (q15.*) and the
# wheels the device lacks (.carry/wheels: gguf, compressed-tensors and its pydantic/loguru).
#   scripts/gpu/eval_h200.sh prep        # join + check + convert the model; FP8-weight copy
#   scripts/gpu/eval_h200.sh longctx     # bf16 / fp8 + center / nvfp4 + center at 4K-32K
#   scripts/gpu/eval_h200.sh fp8w        # GSM8K of the FP8-weight model with its own scales
#   scripts/gpu/eval_h200.sh gputests    # the GPU tests of rotation, 4-over-6 and the kernels
#   scripts/gpu/eval_h200.sh sampled K   # sampled protocol, K samples (resumes a smaller run)
#   scripts/gpu/eval_h200.sh bencheval   # issue 18: fp4kv nvfp4 + center vs vLLM bf16, same 1319 prompts,
#                                        # then fp4kv --no-refill for the per-question comparison
#                                        # (needs the vLLM wheel set of ../shared/device/vllm in /tmp/w)
# Results under /tmp/res (kept while the machine stays warm), copied to $OUT/res.tgz.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
q15=/tmp/q15 sum=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
res=/tmp/res
mkdir -p $res
fp4kv() { python3 -m fp4kv_cli "$@"; }
save() { [ -n "${OUT:-}" ] && tar czf "$OUT/res.tgz" --exclude='*.pt' -C $res . || true; }
trap save EXIT
case "${1:?stage}" in
  prep)
    cat /tmp/m/q15.* > /tmp/q15.gguf && echo "$sum  /tmp/q15.gguf" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/m/*.whl
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
    fp4kv convert /tmp/q15.gguf --out $q15 && rm /tmp/q15.gguf
    python3 scripts/make_fp8_checkpoint.py $q15 /tmp/q15-w8 ;;
  longctx)
    fp4kv eval longctx --model $q15 --scales docs/runs/q15.ck.scales.json --kv-dtype bf16,fp8,nvfp4 \
      --lengths 4k,8k,16k,32k --limit 8 --out $res --run-name q15-longctx 2>&1 | tee $res/longctx.log ;;
  fp8w)
    fp4kv eval gsm8k --model /tmp/q15-w8 --scales docs/runs/q15-w8.ck.scales.json --kv-dtype bf16,fp8,nvfp4 \
      --batch-size 512 --fidelity-samples 32 --out $res --run-name q15-w8 2>&1 | tee $res/fp8w.log ;;
  gputests)
    python3 -m pytest -q -p no:cacheprovider tests/test_rotation.py -k cuda 2>&1 | tee $res/gputests.log
    python3 -m pytest -q -p no:cacheprovider tests/test_rotation.py 2>&1 | tail -40 | tee -a $res/gputests.log ;;
  sampled)
    resume=(); [ -d $res/q15-sampled ] && resume=(--resume)
    fp4kv eval gsm8k --model $q15 --scales docs/runs/q15.ck.scales.json --kv-dtype bf16,fp8,nvfp4 \
      --temperature 0.7 --top-p 0.8 --seed 0 --samples "${2:?K}" "${resume[@]}" --batch-size 512 \
      --no-fidelity --out $res --run-name q15-sampled 2>&1 | tee -a $res/sampled.log ;;
  bencheval)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_v /tmp/w/*.whl
    export PYTHONPATH=/tmp/site_v:$PYTHONPATH VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
    python3 -m pytest -q -p no:cacheprovider tests/test_refill.py -k gpu 2>&1 | tee $res/bencheval.log
    fp4kv bench eval --model $q15 --scales docs/runs/q15.ck.scales.json --kv-dtype nvfp4 --dtype bf16 \
      --out $res --run-name bench-eval-q15 2>&1 | tee -a $res/bencheval.log
    fp4kv eval gsm8k --model $q15 --scales docs/runs/q15.ck.scales.json --kv-dtype nvfp4 --dtype bf16 \
      --no-refill --no-fidelity --out $res --run-name q15-norefill 2>&1 | tee -a $res/bencheval.log
    python3 scripts/accuracy_table.py $res/bench-eval-q15/fp4kv $res/q15-norefill --out $res/refill-acc.json
    python3 scripts/compare_runs.py $res/refill-acc.json --pair fp4kv:nvfp4 q15-norefill:nvfp4 \
      --out $res/refill-pair.json 2>&1 | tee -a $res/bencheval.log ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
