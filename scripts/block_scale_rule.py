"""Do NVFP4 writer-side choices lower the KV cache's damage? (issue 7, item 4)

Two choices a writer can make without changing what any NVFP4 reader does: the block-scale rule
("4 over 6", below) and the global scale ``g`` the block scales are relative to (``--amax-factors``:
``g`` from ``f x amax`` with ``f < 1`` clips the largest blocks in exchange for finer E4M3 block
scales below them, the effect a global-scale search by MSE would exploit).

The shipped NVFP4 quantizer maps each 16-element block's max to the largest E2M1 value, 6
(block scale ``sf = e4m3(max / (6 g))``). "4 over 6" (Four Over Six, 2025) tries a second
candidate per block, the max mapped to 4 (``sf = e4m3(max / (4 g))``, so the top of the block
lands on the finer part of the E2M1 grid), and keeps whichever reconstructs the block with the
smaller squared error. Readers are unchanged (a block scale is a block scale), so it is a
write-path-only choice.

This script measures both before any kernel carries them: teacher-forced fidelity (mean KL vs
the bf16 cache, top-1 agreement) on GSM8K test prompts + gold answers, through ``fp4kv eval
gsm8k``'s own fidelity path, once with the shipped rule, once with the PyTorch reference quantizer
replaced by the 4-over-6 one (every run uses the PyTorch backend, ``FP4KV_BACKEND=torch``, which
calls the reference, so every K and V write of the cache goes through it; on a GPU too), and once
with the shipped rule per ``--amax-factors`` value ``f != 1`` (every layer's K and V amax in the
scales file multiplied by ``f``). Prints machine, versions and the figures, saves them as JSON.

usage: python scripts/block_scale_rule.py --model DIR --scales scales.json [--samples 16]
       [--amax-factors 1,0.75,0.5] [--device auto] [--out block_scale_rule.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers
from rich.console import Console
from rich.table import Table

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.evaluate.runner import EvalSettings, run_gsm8k
from fp4kv_cli.quant import reference
from fp4kv_cli.quant.formats import e2m1_decode, e4m3_decode, pack_nibbles

#: 1 / (E2M1 value the block max is mapped to): 6 first, as the shipped writer rounds it (its
#: float32 1/6), so ties keep the shipped choice; 1/4 is exact.
CANDIDATE_RECIPROCALS = (reference._ONE_SIXTH, 0.25)


def nvfp4_quantize_four_over_six(
    x: torch.Tensor, global_scale: float | torch.Tensor, check: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 quantize like :func:`reference.nvfp4_quantize_reference`, each block's scale the
    better (smaller squared reconstruction error) of ``max -> 6`` and ``max -> 4``."""
    if check:
        reference.check_finite(x)
        reference.check_global_scale(global_scale)
    blocks = reference._blocks(x)
    g = reference.as_global_scale(global_scale, x.device)
    best_err = best_codes = best_sf = None
    for reciprocal_top in CANDIDATE_RECIPROCALS:
        sf_byte, codes = reference._nvfp4_encode(blocks, g, reciprocal_top)
        read = (e2m1_decode(codes) * e4m3_decode(sf_byte).unsqueeze(-1)) * g  # the NVFP4 reader's fp32
        err = ((read - blocks) ** 2).sum(dim=-1)
        if best_err is None:
            best_err, best_codes, best_sf = err, codes, sf_byte
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_codes = torch.where(better.unsqueeze(-1), codes, best_codes)
        best_sf = torch.where(better, sf_byte, best_sf)
    return pack_nibbles(best_codes.reshape(x.shape[0], -1)), best_sf


def four_over_six() -> contextlib.AbstractContextManager:
    """Route the reference NVFP4 quantizer (the PyTorch backend's) through the 4-over-6 rule."""
    return mock.patch.object(reference, "nvfp4_quantize_reference", nvfp4_quantize_four_over_six)


def scaled_scales(path: str, factor: float, folder: Path) -> str:
    """A copy of the scales file at ``path`` in ``folder`` with every K and V amax times ``factor``."""
    data = json.loads(Path(path).read_text())
    for layer in data["layers"]:
        for key in ("k_amax", "v_amax"):
            layer[key] *= factor
        for key in ("k_amax_per_head", "v_amax_per_head"):
            if layer.get(key) is not None:
                layer[key] = [amax * factor for amax in layer[key]]
    scaled = folder / f"scales-x{factor:g}.json"
    write_json_atomic(scaled, data)
    return str(scaled)


def fidelity(args: argparse.Namespace, scales: str, out: Path, name: str) -> dict[str, float]:
    """Positions, KL, top-1 and mean per-layer K / V relative error of nvfp4 vs bf16 (the eval's
    fidelity; generation cut to one token)."""
    settings = EvalSettings(
        model=args.model, kv_dtypes=("bf16", "nvfp4"), scales=scales, limit=args.samples,
        batch_size=args.samples, max_new_tokens=1, device=args.device, fidelity_samples=args.samples,
        out=str(out), run_name=name, decode_attention="gather",
    )  # fmt: skip
    row = run_gsm8k(settings, Console(stderr=True))["results"]["nvfp4"]["fidelity"]
    return {
        "positions": row["tokens"],
        "kl": row["kl"],
        "top1": row["top1"],
        "k_rel_error": sum(row["k_rel_error"]) / len(row["k_rel_error"]),
        "v_rel_error": sum(row["v_rel_error"]) / len(row["v_rel_error"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--scales", required=True)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--amax-factors", default="1", help="comma-separated f: g from f x amax")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="block_scale_rule.json")
    args = parser.parse_args()
    os.environ["FP4KV_BACKEND"] = "torch"  # the rule exists only in the reference: both runs use it
    factors = [float(f) for f in args.amax_factors.split(",") if float(f) != 1.0]
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        shipped = fidelity(args, args.scales, Path(tmp), "max-to-6")
        with four_over_six():
            candidate = fidelity(args, args.scales, Path(tmp), "four-over-six")
        clipped = {
            f"{f:g}": fidelity(args, scaled_scales(args.scales, f, Path(tmp)), Path(tmp), f"amax-x{f:g}")
            for f in factors
        }
    table = Table(title=f"NVFP4 writer choices, {args.model}, {args.samples} GSM8K test prompts + answers")
    for column in ("rule", *shipped):
        table.add_column(column, justify="right")
    rows = [("max -> 6, g from amax (shipped)", shipped), ("4 over 6, g from amax", candidate)]
    rows += [(f"max -> 6, g from {f} x amax", row) for f, row in clipped.items()]
    for rule, row in rows:
        table.add_row(rule, *(f"{value:.4g}" for value in row.values()))
    console.print(table)
    result = {
        "machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
        "transformers": transformers.__version__, "model": args.model, "scales": args.scales,
        "samples": args.samples, "max_to_6": shipped, "four_over_six": candidate, "amax_factors": clipped,
    }  # fmt: skip
    write_json_atomic(Path(args.out), result)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
