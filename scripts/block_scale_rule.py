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

This script measures both: teacher-forced fidelity (mean KL vs the bf16 cache, top-1 agreement)
on GSM8K test prompts + gold answers, through ``fp4kv eval gsm8k``'s own fidelity path, with the
shipped rule (``nvfp4``), with the shipped ``nvfp4_4over6`` format (the 4-over-6 writer, as vLLM's
``--kv-cache-dtype nvfp4_4over6``: see fp4kv_cli/quant/reference.py), and with the shipped rule
per ``--amax-factors`` value ``f != 1`` (every layer's K and V amax in the scales file multiplied
by ``f``). Prints machine, versions and the figures, saves them as JSON.

usage: python scripts/block_scale_rule.py --model DIR --scales scales.json [--samples 16]
       [--amax-factors 1,0.75,0.5] [--device auto] [--out block_scale_rule.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers
from rich.console import Console
from rich.table import Table

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.evaluate.runner import EvalSettings, run_gsm8k


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


def fidelity(
    args: argparse.Namespace, scales: str, out: Path, name: str, formats: tuple[str, ...] = ("nvfp4",)
) -> dict[str, dict[str, float]]:
    """Per format: positions, KL, top-1 and mean per-layer K / V relative error vs bf16 (the eval's
    fidelity; generation cut to one token)."""
    settings = EvalSettings(
        model=args.model, kv_dtypes=("bf16", *formats), scales=scales, limit=args.samples,
        batch_size=args.samples, max_new_tokens=1, device=args.device, fidelity_samples=args.samples,
        out=str(out), run_name=name, decode_attention="gather",
    )  # fmt: skip
    results = run_gsm8k(settings, Console(stderr=True))["results"]
    rows = {kv: results[kv]["fidelity"] for kv in formats}
    return {
        kv: {
            "positions": row["tokens"],
            "kl": row["kl"],
            "top1": row["top1"],
            "k_rel_error": sum(row["k_rel_error"]) / len(row["k_rel_error"]),
            "v_rel_error": sum(row["v_rel_error"]) / len(row["v_rel_error"]),
        }
        for kv, row in rows.items()
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
    factors = [float(f) for f in args.amax_factors.split(",") if float(f) != 1.0]
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        rules = fidelity(args, args.scales, Path(tmp), "rules", ("nvfp4", "nvfp4_4over6"))
        shipped, candidate = rules["nvfp4"], rules["nvfp4_4over6"]
        clipped = {
            f"{f:g}": fidelity(args, scaled_scales(args.scales, f, Path(tmp)), Path(tmp), f"amax-x{f:g}")[
                "nvfp4"
            ]
            for f in factors
        }
    table = Table(title=f"NVFP4 writer choices, {args.model}, {args.samples} GSM8K test prompts + answers")
    for column in ("rule", *shipped):
        table.add_column(column, justify="right")
    rows = [("max -> 6, g from amax (nvfp4)", shipped), ("4 over 6, g from amax (nvfp4_4over6)", candidate)]
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
