"""Host cost of one decode step, isolated: a model of negligible compute with a real layer count.

A randomly initialised Qwen2 with 28 layers (the 1.5B's depth) but hidden size 64 decodes on the
CPU, where every op's cost is then its Python and dispatch overhead: the per-step time is what
the host spends before a GPU could even start. Variants: ``generate`` with transformers'
``DynamicCache`` (the issue's reference setup), a bare loop of model forwards with the same cache
(what ``generate``'s own bookkeeping adds), and ``generate`` with our cache in each format
(PyTorch reference quant backend on CPU, so the FP4 rows overstate what the GPU kernels cost).
Median of ``--repeats`` runs in rotating order; (time of N+2 tokens - time of 2 tokens) / N.

usage: python scripts/bench_host_step.py [--layers 28] [--new-tokens 32] [--repeats 5] [--out host_step.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_calibrate import machine
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.models import cache_argument
from fp4kv_cli.quant.methods import LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method


def tiny_model(layers: int) -> Any:
    """Qwen2 with ``layers`` layers, hidden 64, 4 query / 2 KV heads of 16 (k_proj bias included)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


def caches(model: Any) -> dict[str, Callable[[], Any]]:
    """Fresh-cache factories per variant name."""
    layers = model.config.num_hidden_layers
    scales = LayerScales(k=torch.full((layers,), 0.01), v=torch.full((layers,), 0.01))
    offsets = torch.zeros(layers, 2, 16)
    return {
        "dynamic": lambda: DynamicCache(config=model.config),
        "bf16": lambda: QuantKVCache.for_model(model.config, get_kv_cache_method("bf16", dtype=torch.float32)),
        "fp8": lambda: QuantKVCache.for_model(model.config, get_kv_cache_method("fp8"), scales),
        "nvfp4+center": lambda: QuantKVCache.for_model(
            model.config, get_kv_cache_method("nvfp4"), scales, k_offsets=offsets
        ),
    }


def run_generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any, tokens: int) -> None:
    if isinstance(cache, QuantKVCache):
        cache.set_token_mask(mask)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                   do_sample=False, pad_token_id=0, **{cache_argument(model): cache})  # fmt: skip


def run_loop(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache: Any, tokens: int) -> None:
    """Greedy decoding as a bare loop of forwards (no logits processors or stopping criteria)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    argument = {cache_argument(model): cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1, **argument)
    last = positions[:, -1:]
    for _ in range(tokens - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        last = last + 1
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=next_ids, attention_mask=mask, position_ids=last, logits_to_keep=1, **argument)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="host_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_model(args.layers)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    factories = caches(model)
    variants: dict[str, Callable[[int], None]] = {
        name: (lambda n, f=f: run_generate(model, ids, mask, f(), n)) for name, f in factories.items()
    }
    variants["dynamic, bare loop"] = lambda n: run_loop(model, ids, mask, factories["dynamic"](), n)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            variants[name](3)  # warm-up
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                start = time.perf_counter()
                variants[name](2)
                short = time.perf_counter() - start
                start = time.perf_counter()
                variants[name](2 + args.new_tokens)
                times[name].append(1e3 * (time.perf_counter() - start - short) / args.new_tokens)
    results = {name: {"ms_per_step": statistics.median(v), "each": v} for name, v in times.items()}
    for name, r in results.items():
        print(f"{name:>18}: {r['ms_per_step']:.2f} ms/step (median of {args.repeats})")
    write_json_atomic(args.out, {"machine": machine(), "layers": args.layers, "batch": 2,
                                 "new_tokens": args.new_tokens, "results": results})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
