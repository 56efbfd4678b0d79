"""Is the fp4kv vLLM plugin active in the engine as it is served (compiled, CUDA graphs on GPU)?

Loads three folders in real vLLM, one after another, and scores the same teacher-forced GSM8K
text (lm-eval 5-shot prompts + gold answers of the first ``--questions`` test questions) with
``prompt_logprobs``: the reference (the original model, bf16 KV), the plain fp8 export (K scales
of raw K) and the centered fp8 export (``--k-centering plugin``). Per engine it prints the layers
that store ``K - k_offset`` (counted on the live model), the mean |log-prob difference| of the
text's tokens against the reference and how often the top-1 token agrees with the reference's.
The plugin is active when the centered export has every layer centered and is much closer to
the reference than the plain one.

usage: python scripts/check_vllm_plugin.py --reference /tmp/q15 --plain /tmp/q15-fp8 \
           --centered /tmp/q15-fp8-ck [--eager] [--questions 4] [--out check.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _name, _value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_USE_FLASHINFER_SAMPLER", "0")):
    os.environ.setdefault(_name, _value)


def score(folder: str, kv: str, eager: bool | None, ids: list[list[int]]) -> dict:
    """Per-token log-probs of ``ids`` (actual token and top-1) in one engine, and its centered layers."""
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from fp4kv_cli.serve.vllm_centering import count_centered
    from fp4kv_cli.serve.vllm_plugin import register

    register()
    cpu = current_platform.is_cpu()
    eager = cpu if eager is None else eager
    extra = {} if cpu else {"gpu_memory_utilization": 0.3}
    start = time.perf_counter()
    llm = LLM(
        model=folder, kv_cache_dtype=kv, enforce_eager=eager, seed=0, enable_prefix_caching=False, **extra
    )
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outputs = llm.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
    actual, top1 = [], []
    for row, out in zip(ids, outputs):
        for token, entry in zip(row[1:], out.prompt_logprobs[1:]):
            actual.append(entry[token].logprob)
            top1.append(max(entry.items(), key=lambda item: item[1].logprob)[0])
    centered = int(sum(llm.apply_model(count_centered)))
    del llm
    gc.collect()
    return {
        "folder": folder,
        "kv": kv,
        "eager": eager,
        "centered_layers": centered,
        "actual": actual,
        "top1": top1,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="original model folder (bf16 KV)")
    parser.add_argument("--plain", required=True, help="fp8 export without --k-centering")
    parser.add_argument("--centered", required=True, help="fp8 export with --k-centering plugin")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled on GPU)")
    parser.add_argument("--out", help="save the figures as JSON")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from fp4kv_cli.evaluate.runner import teacher_forced_samples

    tokenizer = AutoTokenizer.from_pretrained(args.reference)
    ids = [prompt + answer for prompt, answer in teacher_forced_samples(tokenizer, args.questions)]
    eager = True if args.eager else None
    runs = [
        score(args.reference, "auto", eager, ids),
        score(args.plain, "fp8", eager, ids),
        score(args.centered, "fp8", eager, ids),
    ]
    ref = runs[0]
    rows = []
    for name, run in zip(("reference bf16", "fp8 plain", "fp8 + plugin"), runs):
        diff = sum(abs(a - b) for a, b in zip(run["actual"], ref["actual"])) / len(ref["actual"])
        agree = sum(a == b for a, b in zip(run["top1"], ref["top1"])) / len(ref["top1"])
        rows.append(
            {
                "engine": name,
                "folder": run["folder"],
                "kv": run["kv"],
                "eager": run["eager"],
                "centered_layers": run["centered_layers"],
                "mean_abs_logprob_diff": diff,
                "top1_agreement": agree,
                "tokens": len(ref["actual"]),
                "seconds": run["seconds"],
            }
        )
        print(
            f"{name:15s} kv {run['kv']:4s} {'eager' if run['eager'] else 'compiled'}: "
            f"{run['centered_layers']:3d} layers centered, mean |dlogprob| {diff:.4f}, top-1 agreement "
            f"{agree:.1%} over {len(ref['actual'])} tokens ({run['seconds']:.0f} s)"
        )
    import vllm

    if args.out:
        Path(args.out).write_text(
            json.dumps({"vllm": vllm.__version__, "questions": args.questions, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
