"""Eval time of each KV format as a ratio of bf16's, through the gather read path (CPU's path).

Two timings per format, both with the caches ``fp4kv eval gsm8k`` builds (``cache_factory``):

- ``generate``: one batch of the eval's prompts (lm-eval gsm8k 5-shot, left padded) greedily
  generated for exactly ``--new-tokens`` tokens (no early stop, so every format does the same
  work), through the eval's own ``generate_batch`` with the gather read;
- ``fidelity``: the teacher-forced pass (prompt prefill, then the gold answer in chunks) of
  ``--fidelity-samples`` questions.

- ``decode_step``: the paired figure, steadiest on a shared machine: every format's cache is
  prefilled with the same batch, then decode steps (the model's forward with the cache, as
  ``generate`` runs it on the gather read) alternate between the formats step by step, so load
  changes hit every format alike; the median step of each is kept.

Each repeat times every format in a rotated order (all see the same machine load); the median is
kept. Prints the machine, versions, seconds and ratios vs bf16 of the same run, and writes JSON.

usage: python scripts/bench_read_path.py --model M [--kv bf16,fp8,nvfp4,blockfp4] [--scales S]
       [--batch-size 8] [--new-tokens 160] [--fidelity-samples 2] [--repeats 2] [--decode-steps 64]
       [--jobs generate,fidelity,decode_step] [--out F.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_calibrate import machine, synchronize

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.evaluate.fidelity import teacher_forced_logits
from fp4kv_cli.evaluate.generate import generate_batch, left_pad, neutral_generation_defaults
from fp4kv_cli.evaluate.prefill import chunked_prefill
from fp4kv_cli.evaluate.runner import cache_factory, load_scales_for, teacher_forced_samples
from fp4kv_cli.gqa_attention import gqa_decode
from fp4kv_cli.model_config import load_config_dict
from fp4kv_cli.models import load_model_and_tokenizer, parse_dtype, resolve_device

REFERENCE = "bf16"


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of ``fn()``: on a shared machine the CPU
    time is the steadier figure (it does not count time other processes held the cores)."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def paired_decode_steps(
    model: object,
    tokenizer: object,
    prompts: list[list[int]],
    make_cache: Callable[[str, int], object],
    formats: list[str],
    steps: int,
) -> dict[str, list[tuple[float, float]]]:
    """``(wall, CPU)`` seconds of each of ``steps`` greedy decode steps per format, the formats
    alternating step by step (order reversed every other step) after each cache is prefilled."""
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, model.device)
    state = {}
    times: dict[str, list[tuple[float, float]]] = {kv: [] for kv in formats}
    with torch.inference_mode(), gqa_decode(model):  # as generate_batch runs the gather read
        for kv in formats:
            cache = make_cache(kv, ids.shape[1] + steps + 1)
            cache.set_token_mask(mask)
            logits = chunked_prefill(model, cache, ids, mask, 1 << 30)
            state[kv] = (cache, logits.argmax(-1, keepdim=True), mask, (mask.cumsum(-1) - 1)[:, -1:])
        for step in range(steps):
            for kv in formats if step % 2 == 0 else formats[::-1]:
                cache, token, step_mask, position = state[kv]
                step_mask = torch.cat([step_mask, step_mask.new_ones(step_mask.shape[0], 1)], 1)
                position = position + 1
                start, cpu = time.perf_counter(), time.process_time()
                out = model(input_ids=token, attention_mask=step_mask, position_ids=position,
                            past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                times[kv].append((time.perf_counter() - start, time.process_time() - cpu))
                state[kv] = (cache, token, step_mask, position)
    for kv in formats:
        wall = statistics.median(t[0] for t in times[kv])
        print(f"  decode_step {kv:>8}: median {wall * 1e3:.1f} ms wall over {steps} paired steps", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kv", default="bf16,fp8,nvfp4,blockfp4")
    parser.add_argument("--scales", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=160)
    parser.add_argument("--fidelity-samples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=64, help="paired decode steps per format")
    parser.add_argument("--jobs", default="generate,fidelity,decode_step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_read_path.json")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    formats = list(dict.fromkeys([REFERENCE, *(k.strip() for k in args.kv.split(",") if k.strip())]))

    device = resolve_device(args.device)
    dtype = parse_dtype("auto", device)
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    neutral_generation_defaults(model)
    scales_file = offsets = None
    if args.scales:
        scales_file, offsets = load_scales_for(load_config_dict(args.model), args.scales)
    make_cache = cache_factory(model.config, formats, scales_file, offsets, dtype, device)
    samples = teacher_forced_samples(tokenizer, max(args.batch_size, args.fidelity_samples))
    prompts = [list(p) for p, _ in samples[: args.batch_size]]
    config = GenerationConfig(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    capacity = max(map(len, prompts)) + args.new_tokens

    def generate(kv: str) -> None:
        generate_batch(model, tokenizer, prompts, make_cache(kv, capacity), config, [], "gather")

    def fidelity(kv: str) -> None:
        for prompt, answer in samples[: args.fidelity_samples]:
            teacher_forced_logits(model, prompt, answer, make_cache(kv, len(prompt) + len(answer)))

    wanted = [j.strip() for j in args.jobs.split(",") if j.strip()]
    jobs = {name: fn for name, fn in {"generate": generate, "fidelity": fidelity}.items() if name in wanted}
    for kv in formats:  # warm-up
        generate_batch(model, tokenizer, prompts[:1], make_cache(kv, capacity), GenerationConfig(
            max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id), [], "gather")  # fmt: skip
    times: dict[str, dict[str, list[tuple[float, float]]]] = {job: {kv: [] for kv in formats} for job in jobs}
    for repeat in range(args.repeats):
        for kv in formats[repeat % len(formats) :] + formats[: repeat % len(formats)]:
            for job, fn in jobs.items():
                wall, cpu = timed(lambda fn=fn, kv=kv: fn(kv), device)
                times[job][kv].append((wall, cpu))
                print(f"  repeat {repeat + 1}/{args.repeats} {job:>8} {kv:>8}: {wall:.2f} s wall, {cpu:.2f} s CPU",
                      flush=True)  # fmt: skip
    if "decode_step" in wanted:
        times["decode_step"] = paired_decode_steps(model, tokenizer, prompts, make_cache, formats, args.decode_steps)
        jobs["decode_step"] = None
    info = machine()
    info["load_average_1_5_15_min"] = list(os.getloadavg())
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"model {args.model}, batch {args.batch_size}, prompts padded to {max(map(len, prompts))} tokens, "
          f"{args.new_tokens} new tokens; fidelity {args.fidelity_samples} samples; median of {args.repeats}")  # fmt: skip
    results: dict[str, dict[str, dict[str, float | list[float]]]] = {}
    for job in jobs:
        ref_wall = statistics.median(t[0] for t in times[job][REFERENCE])
        ref_cpu = statistics.median(t[1] for t in times[job][REFERENCE])
        results[job] = {}
        for kv in formats:
            wall = statistics.median(t[0] for t in times[job][kv])
            cpu = statistics.median(t[1] for t in times[job][kv])
            results[job][kv] = {
                "wall_seconds": wall, "wall_ratio_vs_bf16": wall / ref_wall,
                "cpu_seconds": cpu, "cpu_ratio_vs_bf16": cpu / ref_cpu,
                "each_wall": [t[0] for t in times[job][kv]], "each_cpu": [t[1] for t in times[job][kv]],
            }  # fmt: skip
            print(f"{job:>8} {kv:>8}: wall {wall:7.2f} s {wall / ref_wall:5.2f}x bf16 | "
                  f"CPU {cpu:7.2f} s {cpu / ref_cpu:5.2f}x bf16")  # fmt: skip
    record = {
        "machine": info,
        "model": args.model,
        "dtype": str(dtype),
        "read_path": "gather",
        "batch_size": args.batch_size,
        "prompt_tokens_padded": max(map(len, prompts)),
        "new_tokens": args.new_tokens,
        "fidelity_samples": args.fidelity_samples,
        "repeats": args.repeats,
        "decode_steps": args.decode_steps,
        "results": results,
    }
    write_json_atomic(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
