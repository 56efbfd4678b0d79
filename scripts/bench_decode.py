"""Decode speed of the quantized KV cache against transformers' ``DynamicCache``, with a profile.

One batch of the eval's own prompts (lm-eval gsm8k 5-shot, left padded) is generated with a fixed
number of new tokens (no early stop, so every variant does the same work) through:

- ``dynamic``: a plain transformers ``DynamicCache`` (the issue's 185 s reference);
- each ``--kv`` format through :class:`fp4kv_cli.cache.QuantKVCache` (``bf16`` isolates the
  cache's own overhead from the quantization kernels), read by the fused decode-attention
  kernel (``<kv>``); with ``--gather`` also by dequantize + SDPA (``<kv>-gather``); with
  ``--graph`` also in static-shape steps replayed as CUDA graphs (``<kv>-graph``).

For each: wall seconds per decode step (prefill timed separately; median of ``--repeats``
runs in rotating order), then a ``torch.profiler`` run
of a few steps whose top operators by device and by host time say where the time goes.

usage: python scripts/bench_decode.py --model M [--kv bf16,nvfp4] [--gather] [--graph] [--scales S] [--batch-size 128]
       [--new-tokens 64] [--repeats 3] [--profile-steps 8] [--out bench_decode.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_calibrate import machine, synchronize
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.data import load_gsm8k
from fp4kv_cli.evaluate.generate import left_pad, neutral_generation_defaults
from fp4kv_cli.evaluate.gsm8k import fewshot_prompts
from fp4kv_cli.evaluate.runner import cache_factory, load_scales_for
from fp4kv_cli.evaluate.static_decode import greedy_static, static_decode_supported
from fp4kv_cli.fused_attention import fused_decode
from fp4kv_cli.model_config import load_config_dict
from fp4kv_cli.models import cache_argument, load_model_and_tokenizer, parse_dtype, resolve_device

TOP_OPS = 12
#: Suffix of the variants that read the cache by dequantize + SDPA instead of the fused kernel.
GATHER = "-gather"
#: Suffix of the variants that decode in static-shape steps replayed as CUDA graphs.
GRAPH = "-graph"
#: Tokens of the graph variants' reference run (prefill, eager step, capture, first replay).
BASE_STEPS = 4


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """Token ids of the first ``count`` GSM8K test prompts, as ``fp4kv eval gsm8k`` builds them."""
    train, test = load_gsm8k("train"), load_gsm8k("test")
    return [tokenizer(t).input_ids for t in fewshot_prompts(test[:count], train, 5)]


def cache_maker(
    model: Any, model_path: str, formats: Sequence[str], dtype: torch.dtype, scales_path: str | None
) -> Callable[[str, int], Any]:
    """``make_cache(variant, capacity)``: a fresh cache of a variant (``dynamic``, or one of
    ``formats`` with or without a ``-gather`` / ``-graph`` suffix); the formats' caches are built
    as ``fp4kv eval gsm8k`` builds them (scales, K offsets and recipe from ``scales_path``)."""
    scales_file = offsets = None
    if scales_path:
        scales_file, offsets = load_scales_for(load_config_dict(model_path), scales_path)
    device = next(model.parameters()).device
    quantized = cache_factory(model.config, formats, scales_file, offsets, dtype, device)

    def make_cache(kv: str, capacity: int) -> Any:
        kv = kv.removesuffix(GATHER).removesuffix(GRAPH)
        return DynamicCache(config=model.config) if kv == "dynamic" else quantized(kv, capacity)

    return make_cache


class ProfilerStep(StoppingCriteria):
    """Advances a ``torch.profiler`` schedule after every forward of ``generate`` (never stops it)."""

    def __init__(self, prof: torch.profiler.profile) -> None:
        self.prof = prof

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.prof.step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    cache: Any,
    new_tokens: int,
    fused: bool,
    stopping: StoppingCriteriaList | None = None,
) -> None:
    """Greedy decoding of exactly ``new_tokens`` tokens per row (fused decode attention if ``fused``)."""
    if isinstance(cache, QuantKVCache):
        cache.set_token_mask(mask)
    with torch.inference_mode(), fused_decode(model, cache) if fused else nullcontext():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=stopping,
            **{cache_argument(model): cache},
        )


def timed(fn: Any, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def profile(fn: Any, device: torch.device, steps: int) -> dict[str, Any]:
    """Top operators of ``steps`` decode steps of ``fn(stopping_criteria)`` (the prefill and the
    first decode step are skipped by the profiler's schedule) by self device and host time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=1, warmup=1, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        fn(StoppingCriteriaList([ProfilerStep(prof)]))
        synchronize(device)
    events = prof.key_averages()
    device_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"

    def top(key: str) -> list[dict[str, Any]]:
        ranked = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:TOP_OPS]
        return [{"op": e.key, "ms": getattr(e, key, 0) / 1e3, "calls": e.count} for e in ranked]

    return {
        "device_ms": sum(getattr(e, device_key, 0) for e in events) / 1e3,
        "host_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
        "top_device": top(device_key),
        "top_host": top("self_cpu_time_total"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kv", default="bf16,nvfp4", help="formats besides the plain DynamicCache")
    parser.add_argument(
        "--gather", action="store_true", help="also time each format's dequantize + SDPA read"
    )
    parser.add_argument(
        "--graph", action="store_true", help="also time static-shape steps replayed as CUDA graphs"
    )
    parser.add_argument("--scales", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median kept)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench_decode.json")
    args = parser.parse_args()
    if args.new_tokens < 2 + (BASE_STEPS if args.graph else 0):
        parser.error(
            f"--new-tokens must be at least {2 + (BASE_STEPS if args.graph else 0)} (step time is a difference)"
        )

    device = resolve_device(args.device)
    dtype = parse_dtype("auto", device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    neutral_generation_defaults(model)
    ids, mask = left_pad(prompts(tokenizer, args.batch_size), tokenizer.pad_token_id, device)
    capacity = ids.shape[1] + args.new_tokens
    formats = [k.strip() for k in args.kv.split(",") if k.strip()]
    make_cache = cache_maker(model, args.model, formats, dtype, args.scales)
    if args.graph and not all(static_decode_supported(model, make_cache(f, capacity)) for f in formats):
        parser.error(
            "--graph needs CUDA, an SDPA model with full attention only, and formats the kernel reads"
        )
    variants = ["dynamic", *formats]
    variants += [f + GATHER for f in formats] if args.gather else []
    variants += [f + GRAPH for f in formats] if args.graph else []

    def run(kv: str, steps: int, stopping: StoppingCriteriaList | None = None) -> None:
        cache = make_cache(kv, capacity)
        if kv.endswith(GRAPH):  # no profiler steps here: a replay is one graph launch
            greedy_static(model, cache, ids, mask, steps)
        else:
            generate(model, ids, mask, cache, steps, not kv.endswith(GATHER), stopping)

    for kv in variants:
        run(kv, 2)  # warm-up: kernel compilation, allocator
    # Each repeat times every variant, in a rotated order, so all see the same machine load.
    times: dict[str, list[tuple[float, float]]] = {kv: [] for kv in variants}
    for repeat in range(args.repeats):
        for kv in variants[repeat % len(variants) :] + variants[: repeat % len(variants)]:
            prefill = timed(lambda kv=kv: run(kv, 1), device)
            # Graph runs capture at their second step: time from a run that has captured.
            base = BASE_STEPS if kv.endswith(GRAPH) else 1
            start = prefill if base == 1 else timed(lambda kv=kv, base=base: run(kv, base), device)
            total = timed(lambda kv=kv: run(kv, args.new_tokens), device)
            times[kv].append((prefill, (total - start) / (args.new_tokens - base)))
    results: dict[str, Any] = {}
    for kv in variants:
        prefill = statistics.median(t[0] for t in times[kv])
        per_step = statistics.median(t[1] for t in times[kv])
        results[kv] = {
            "prefill_s": prefill,
            "decode_ms_per_step": 1e3 * per_step,
            "decode_ms_per_step_each": [1e3 * t[1] for t in times[kv]],
        }
        print(
            f"{kv:>8}: prefill {prefill:.3f} s, decode {1e3 * per_step:.2f} ms/step (median of {args.repeats})"
        )
        if kv.endswith(GRAPH):  # its steps are graph replays (capture included in the time above)
            continue
        prof = profile(
            lambda stopping, kv=kv: run(kv, args.profile_steps + 3, stopping), device, args.profile_steps
        )
        results[kv]["profile"] = prof
        print(f"    profile of {args.profile_steps} decode steps: device {prof['device_ms']:.0f} ms, "
              f"host {prof['host_ms']:.0f} ms")  # fmt: skip
        for label in ("top_device", "top_host"):
            for row in prof[label][:8]:
                print(f"    {label[4:]:>6} {row['ms']:9.2f} ms {row['calls']:6d}x {row['op'][:70]}")
    record = {
        "machine": machine(),
        "model": args.model,
        "batch_size": args.batch_size,
        "prompt_tokens_padded": ids.shape[1],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "results": results,
    }
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
