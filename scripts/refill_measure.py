"""Refilled rows vs one batch at a time in the static-shape decode, on the CPU, in one run.

Generates the same GSM8K few-shot prompts both ways (the batch path of ``generate_batch`` with
``decode="graph"``, and :func:`fp4kv_cli.evaluate.refill.generate_refilled`) and prints, per
path, the decode steps, the row-steps they computed (steps x rows of the step), the tokens the
rows keep, the row-steps wasted on rows that had already stopped (``row-steps - (kept - rows)``:
each kept token after the prefill's first needs one step), the prefill forwards' calls, wall and
CPU seconds, their ratios, and how many questions got the same output both ways.

The decode step reads the cache's buffers through :func:`torch_reader`, a PyTorch stand-in for
the Triton decode-attention kernel (the interpreted kernel takes seconds per layer-step on a
CPU): every slot dequantized by the layer's method, fp32 attention under the step's mask. The
tests use it too.

usage: python scripts/refill_measure.py [--model PATH|tiny] [--questions 16] [--batch 8]
       [--max-new-tokens 64] [--kv blockfp4] [--num-fewshot 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.table import Table

from fp4kv_cli import fused_attention
from fp4kv_cli.quant.registry import get_kv_cache_method


def torch_reader() -> SimpleNamespace:
    """A decode-attention kernel module in PyTorch (``KVSource``, ``decode_attention``,
    ``can_read``, ``INTERPRETED``), to stand in for :func:`fp4kv_cli.fused_attention.decode_kernels`
    on a CPU: every slot dequantized by the layout's method, fp32 attention under the mask."""
    from fp4kv_cli.quant.kernels.decode_attention import FORMAT_IDS, KVSource

    def values(source: KVSource) -> torch.Tensor:
        method = (get_kv_cache_method(source.fmt, dtype=source.data.dtype) if source.fmt == "bf16"
                  else get_kv_cache_method(source.fmt))  # fmt: skip
        return method.dequantize(source.data, source.block_scales, None, source.tensor_scale, torch.float32)

    def decode_attention(q: torch.Tensor, k: KVSource, v: KVSource, length: int, capacity: int,
                         mask: torch.Tensor | None, scale: float, num_splits: int | None = None) -> torch.Tensor:  # fmt: skip
        batch, q_heads, dim = q.shape
        keys = values(k).view(batch, capacity, -1, dim)[:, :length].permute(0, 2, 3, 1)
        vals = values(v).view(batch, capacity, -1, dim)[:, :length].transpose(1, 2)
        query = q.float().view(batch, keys.shape[1], -1, dim)  # [batch, kv heads, group, dim]
        scores = torch.matmul(query, keys) * scale  # [batch, kv heads, group, length]
        if mask is not None:
            scores = scores.masked_fill(~mask.expand(batch, length)[:, None, None, :], -math.inf)
        return torch.matmul(scores.softmax(-1), vals).reshape(batch, q_heads, dim).to(q.dtype)

    def can_read(fmt: str, buffer_dtype: torch.dtype, model_dtype: torch.dtype, head_dim: int,
                 device: torch.device) -> bool:  # fmt: skip
        return fmt in FORMAT_IDS and (fmt != "bf16" or buffer_dtype == model_dtype)

    return SimpleNamespace(
        KVSource=KVSource, decode_attention=decode_attention, can_read=can_read, INTERPRETED=True
    )


def tiny_model() -> tuple[Any, Any]:
    """A random 2-layer Llama and the tests' offline character tokenizer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import char_tokenizer  # the tests' offline character tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = char_tokenizer(with_pad=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both paths over the same prompts; returns the JSON report."""
    from fp4kv_cli.cache import QuantKVCache
    from fp4kv_cli.data import load_gsm8k
    from fp4kv_cli.evaluate import gsm8k
    from fp4kv_cli.evaluate.generate import generate_batch, greedy_config, neutral_generation_defaults
    from fp4kv_cli.evaluate.refill import RefillCounts, generate_refilled, refill_refusal
    from fp4kv_cli.evaluate.static_decode import CHECK_EVERY
    from fp4kv_cli.models import load_model_and_tokenizer

    kernels = torch_reader()
    fused_attention.decode_kernels = lambda: kernels
    if args.model == "tiny":
        model, tokenizer = tiny_model()
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, "cpu", "fp32")
    neutral_generation_defaults(model)
    questions = load_gsm8k("test")[: args.questions]
    prompts = gsm8k.fewshot_prompts(questions, load_gsm8k("train"), args.num_fewshot)
    prompt_ids = tokenizer(prompts)["input_ids"]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # as the eval runs them
    prompt_ids = [prompt_ids[i] for i in order]
    stops = list(gsm8k.STOP_SEQUENCES) + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    config = greedy_config(model, tokenizer, args.max_new_tokens, stops)
    dtype = next(model.parameters()).dtype
    method = get_kv_cache_method(args.kv, dtype=dtype) if args.kv == "bf16" else get_kv_cache_method(args.kv)
    if method.uses_tensor_scale:
        raise SystemExit(f"error: --kv {args.kv} needs calibrated scales; use bf16 or blockfp4 here")

    def make_cache(hint: int) -> QuantKVCache:
        return QuantKVCache.for_model(model.config, method, None, capacity_hint=hint)

    refusal = refill_refusal(model, make_cache(1))
    if refusal is not None:
        raise SystemExit(f"error: refilled static decode cannot run: {refusal}")
    report: dict[str, Any] = {"model": args.model, "kv": args.kv, "questions": len(prompt_ids), "batch": args.batch,
                              "max_new_tokens": args.max_new_tokens, "check_every": CHECK_EVERY,
                              "prompt_tokens": [min(map(len, prompt_ids)), max(map(len, prompt_ids))]}  # fmt: skip
    # Batch path: greedy_static per batch; its steps are the tokens of the longest row less the prefill's.
    from fp4kv_cli.evaluate import generate as generate_module

    steps = {"steps": 0, "row_steps": 0}
    real_tokens = generate_module.generate_tokens

    def counted(*a: Any, **k: Any) -> Any:
        tokens, counts = real_tokens(*a, **k)
        steps["steps"] += tokens.shape[1] - 1
        steps["row_steps"] += tokens.shape[0] * (tokens.shape[1] - 1)
        return tokens, counts

    generate_module.generate_tokens = counted
    wall, cpu = time.perf_counter(), time.process_time()
    batched = []
    for first in range(0, len(prompt_ids), args.batch):
        group = prompt_ids[first : first + args.batch]
        batched += generate_batch(model, tokenizer, group, make_cache(max(map(len, group)) + args.max_new_tokens),
                                  config, stops, "graph")  # fmt: skip
    generate_module.generate_tokens = real_tokens
    kept = sum(c.new_tokens for c in batched)
    report["batch_path"] = {**steps, "kept_tokens": kept, "prefills": math.ceil(len(prompt_ids) / args.batch),
                            "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}  # fmt: skip
    counts = RefillCounts()
    wall, cpu = time.perf_counter(), time.process_time()
    refilled: dict[int, Any] = {}
    for items, texts, _ in generate_refilled(model, tokenizer, prompt_ids, make_cache, config, stops, args.batch,
                                             counts=counts):  # fmt: skip
        refilled.update(zip(items, texts))
    report["refill"] = {"steps": counts.steps, "row_steps": counts.slot_steps, "kept_tokens": counts.kept_tokens,
                        "prefills": counts.prefills, "wall_s": time.perf_counter() - wall,
                        "cpu_s": time.process_time() - cpu}  # fmt: skip
    rows = len(prompt_ids)
    for path in ("batch_path", "refill"):
        report[path]["wasted_row_steps"] = report[path]["row_steps"] - (report[path]["kept_tokens"] - rows)
    report["same_output"] = sum(refilled[i] == batched[i] for i in range(rows))
    report["ratio_refill_over_batch"] = {
        key: report["refill"][key] / report["batch_path"][key] if report["batch_path"][key] else None
        for key in ("steps", "row_steps", "wasted_row_steps", "wall_s", "cpu_s")
    }
    return report


def table(report: dict[str, Any]) -> Table:
    """The report as a rich table: one row per measure, both paths and their ratio."""
    out = Table(title=f"static decode on CPU, {report['model']}, {report['kv']}, {report['questions']} GSM8K "
                      f"questions, {report['batch']} rows, {report['max_new_tokens']} new tokens; same output: "
                      f"{report['same_output']}/{report['questions']}")  # fmt: skip
    for column in ("measure", "one batch at a time", "refilled rows", "refill / batch"):
        out.add_column(column, justify="left" if column == "measure" else "right")
    for key in ("steps", "row_steps", "kept_tokens", "wasted_row_steps", "prefills", "wall_s", "cpu_s"):
        a, b = report["batch_path"][key], report["refill"][key]
        ratio = report["ratio_refill_over_batch"].get(key)
        fmt = "{:.1f}" if key.endswith("_s") else "{:,}"
        out.add_row(key, fmt.format(a), fmt.format(b), "-" if ratio is None else f"{ratio:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: measure both paths, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="model folder or .gguf, or 'tiny' (random 2-layer Llama)"
    )
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--kv", default="blockfp4", help="bf16 or blockfp4 (no tensor scale to calibrate)")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(args)
    Console().print(table(report))
    if args.json is not None:
        from fp4kv_cli.atomic import write_json_atomic

        write_json_atomic(args.json, report)
    print(json.dumps(report["ratio_refill_over_batch"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
