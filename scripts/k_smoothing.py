"""Would per-RoPE-pair K smoothing (or another block layout) lower NVFP4's damage on centered K?

SmoothAttention (QServe, 2024) divides K channel ``c`` by ``lambda_c = max|K_c|^alpha`` and
multiplies the query's channel by the same factor, so every score ``q.k`` is unchanged while
outlier channels stop owning their quantization block. Applied post-RoPE it must use one factor
per rotary pair (``c`` and ``c + head_dim/2``): then it commutes with RoPE and folds into the
``q_proj`` / ``k_proj`` weights and biases, so an engine would serve it from a re-weighted
checkpoint with unchanged kernels.

Before building that, this script measures what it could gain, at the attention itself: it
captures every layer's post-RoPE queries and keys on GSM8K test prompts + gold answers (the
fidelity text), centers K with the scales file's ``k_offset``, smooths it with each ``alpha``
(``alpha = 0``: the shipped centered cache, except that ``g`` is taken from these keys instead of
the calibrated amax), stores it through the quant core's NVFP4 method (:func:`round_trip`) with
``g = amax / (6 * 448)`` of the smoothed keys, and reports per layer the mean over prompts of the
mean over query rows and heads of KL(softmax(q.k / sqrt(d)) || softmax(q.k_hat / sqrt(d))) under
the causal mask.
The smoothing factors and ``g`` come from the same prompts (in-sample: an upper bound on what
calibrated factors would gain). Two more rows put the figures in scale: NVFP4 blocks of 16
*tokens* per channel instead of 16 channels per token (KIVI's layout for K, which an engine could
only write 16 tokens at a time) and per-tensor FP8 (``s = amax / 448``), both of the centered,
unsmoothed K. Prints machine, versions and the figures, saves them as JSON.

usage: python scripts/k_smoothing.py --model DIR --scales centered.scales.json [--samples 3]
       [--alphas 0,0.25,0.5,0.75,1] [--out k_smoothing.json]   (alphas start with 0: the baseline)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers
from rich.console import Console
from rich.table import Table
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fp4kv_cli.analysis.decompose import dynamic_scale
from fp4kv_cli.analysis.round_trip import round_trip
from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.data import load_gsm8k
from fp4kv_cli.evaluate.gsm8k import fewshot_prompts
from fp4kv_cli.evaluate.runner import load_scales_for
from fp4kv_cli.model_config import load_config_dict
from fp4kv_cli.models import load_model_and_tokenizer
from fp4kv_cli.quant.methods import KVCacheMethod
from fp4kv_cli.quant.registry import get_kv_cache_method

CAPTURE = "fp4kv_capture_qk"
#: The rows after the alphas: centered K, unsmoothed, stored another way.
REFERENCE_ROWS = ("nvfp4, blocks of 16 tokens", "fp8 per tensor")
NVFP4, FP8 = get_kv_cache_method("nvfp4"), get_kv_cache_method("fp8")


def capture_queries_and_keys(model, tokenizer, text: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (q [heads, T, d], k [kv_heads, T, d])}`` post-RoPE, fp32, of one text."""
    captured = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = (query[0].float(), key[0].float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.no_grad():
            model(tokenizer(text, return_tensors="pt").input_ids.to(model.device))
    finally:
        model.set_attn_implementation(previous)
    return captured


def pair_factors(centered: torch.Tensor, alpha: float) -> torch.Tensor:
    """``lambda [kv_heads, d]``: one ``max|K|^alpha`` per rotary pair, geometric mean 1 per head."""
    half = centered.shape[-1] // 2
    magnitude = centered.abs().amax(dim=1)
    pair = torch.maximum(magnitude[:, :half], magnitude[:, half:]).clamp_min(1e-6) ** alpha
    pair = pair / pair.log().mean(dim=1, keepdim=True).exp()
    return torch.cat([pair, pair], dim=1)


def stored(method: KVCacheMethod, x: torch.Tensor) -> torch.Tensor:
    """``x [heads, T, d]`` written through ``method`` with its scale from ``x``'s own amax, read back."""
    rows = x.transpose(0, 1)
    return round_trip(method, rows, dynamic_scale(method, rows)).transpose(0, 1)


def token_blocks_stored(method: KVCacheMethod, x: torch.Tensor) -> torch.Tensor:
    """Like :func:`stored`, with ``method``'s blocks along 16 tokens per channel (zero-padded)."""
    tokens = x.shape[1]
    by_channel = torch.nn.functional.pad(x.transpose(1, 2), (0, -tokens % 16))  # [heads, d, T']
    return stored(method, by_channel.transpose(0, 1)).transpose(0, 1).transpose(1, 2)[:, :tokens]


def attention_kl(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor) -> float:
    """Mean over heads and query rows of the causal attention KL of ``k_hat`` vs ``k``."""
    group = q.shape[0] // k.shape[0]
    scale = q.shape[-1] ** -0.5
    future = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=q.device).triu(1)
    ref = (q @ k.repeat_interleave(group, 0).transpose(1, 2) * scale).masked_fill(future, -torch.inf)
    got = (q @ k_hat.repeat_interleave(group, 0).transpose(1, 2) * scale).masked_fill(future, -torch.inf)
    ref, got = ref.log_softmax(-1), got.log_softmax(-1)
    return (ref.exp() * (ref - got)).masked_fill(future, 0).sum(-1).mean().item()


def layer_kls(q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor, alphas: list[float]) -> list[float]:
    """Attention KL of NVFP4 centered K per ``alpha`` (q scaled by the factors K is divided by),
    then of centered K in NVFP4 blocks of 16 tokens and in FP8 (rows :data:`REFERENCE_ROWS`)."""
    centered = k - offset[:, None, :]
    kls = []
    for alpha in alphas:
        factors = pair_factors(centered, alpha)
        smoothed = centered / factors[:, None, :]
        queries = q * factors.repeat_interleave(q.shape[0] // k.shape[0], 0)[:, None, :]
        kls.append(attention_kl(queries, smoothed, stored(NVFP4, smoothed)))
    kls.append(attention_kl(q, centered, token_blocks_stored(NVFP4, centered)))
    kls.append(attention_kl(q, centered, stored(FP8, centered)))
    return kls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--scales", required=True, help="centered scales file (k_offset per layer)")
    parser.add_argument("--samples", type=int, default=3, help="GSM8K test questions (prompt + gold)")
    parser.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="k_smoothing.json")
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    if alphas[0] != 0:
        raise SystemExit(
            f"error: --alphas must start with 0 (the shipped cache, the baseline); got {args.alphas}"
        )
    offsets = load_scales_for(load_config_dict(args.model), args.scales)[1]
    if offsets is None:
        raise SystemExit(f"error: {args.scales} has no k_offset; calibrate with fp4kv calibrate --center-k")
    model, tokenizer = load_model_and_tokenizer(args.model, args.device, "bf16")
    if set(getattr(model.config, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        raise SystemExit(
            f"error: {args.model} has sliding-window layers; this script scores full causal attention"
        )
    offsets = offsets.to(model.device)
    test = load_gsm8k("test")[: args.samples]
    prompts = fewshot_prompts(test, load_gsm8k("train"), 5)
    per_layer: list[list[list[float]]] = [[] for _ in offsets]  # [layer][sample][alpha]
    for prompt, row in zip(prompts, test):
        for layer, (q, k) in capture_queries_and_keys(model, tokenizer, f"{prompt} {row['answer']}").items():
            per_layer[layer].append(layer_kls(q, k, offsets[layer], alphas))
    means = [[statistics.mean(column) for column in zip(*samples)] for samples in per_layer]
    machine = {
        "machine": platform.platform(), "processor": platform.processor(), "device": str(model.device),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }  # fmt: skip
    table = Table(title=f"Centered K, attention KL per layer ({args.samples} GSM8K prompts + answers)")
    for column in ("K stored as", "mean over layers", "mean, layers 1+", "layers below alpha 0", "layer 0"):
        table.add_column(column, justify="right")
    rows = []
    for i, label in enumerate([f"nvfp4, alpha {alpha:g}" for alpha in alphas] + list(REFERENCE_ROWS)):
        column = [m[i] for m in means]
        rows.append(
            {"k_stored_as": label, "mean": statistics.mean(column), "mean_layers_1_on": statistics.mean(column[1:]),
             "layers_below_alpha_0": sum(m[i] < m[0] for m in means), "per_layer": column}
        )  # fmt: skip
        cells = (f"{rows[-1]['mean']:.5f}", f"{rows[-1]['mean_layers_1_on']:.5f}")
        table.add_row(label, *cells, f"{rows[-1]['layers_below_alpha_0']}/{len(column)}", f"{column[0]:.5f}")
    console = Console()
    console.print(machine)
    console.print(table)
    write_json_atomic(
        args.out,
        {**machine, "model": args.model, "scales": args.scales, "samples": args.samples, "rows": rows},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
