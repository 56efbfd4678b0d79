"""Sweep the Triton FP4 kernels' tile size and warp count on a CUDA GPU.

For every (tile elements, warps) pair, given to both kernels, times NVFP4 quantize and dequantize of one bf16
tensor (``--tokens x 128``, default 64M elements) with ``triton.testing.do_bench`` and checks
that the bytes equal those of the shipped configuration. Prints effective GB/s (bytes read +
written) per configuration and saves them as JSON; the shipped defaults live in
``fp4kv_cli/quant/kernels/triton_fp4.py``.

usage: python scripts/tune_fp4_kernels.py [--tokens 524288] [--out tune_fp4_kernels.json]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_calibrate import machine

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.quant.kernels import triton_fp4

TILES = (1024, 2048, 4096, 8192)
WARPS = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=524288, help="rows of 128 elements")
    parser.add_argument("--out", default="tune_fp4_kernels.json")
    args = parser.parse_args()
    backend = triton_fp4.TritonBackend()
    x = torch.randn(args.tokens, 128, device="cuda").to(torch.bfloat16)
    g = (x.float().abs().amax() / 2688).reshape(())
    names = ("QUANTIZE_TILE_ELEMENTS", "QUANTIZE_WARPS", "DEQUANTIZE_TILE_ELEMENTS", "DEQUANTIZE_WARPS")
    defaults = {name: getattr(triton_fp4, name) for name in names}
    packed, scales = backend.quantize("nvfp4", x, g)
    elements = x.numel()
    q_bytes = elements * (2 + 0.5 + 1 / 16)
    rows = []
    for tile, warps in itertools.product(TILES, WARPS):
        for name, value in zip(names, (tile, warps, tile, warps)):
            setattr(triton_fp4, name, value)
        p, s = backend.quantize("nvfp4", x, g)
        y = backend.dequantize("nvfp4", packed, scales, g, torch.bfloat16)
        exact = torch.equal(p, packed) and torch.equal(s, scales)
        q_ms = triton.testing.do_bench(lambda: backend.quantize("nvfp4", x, g))
        d_ms = triton.testing.do_bench(lambda: backend.dequantize("nvfp4", packed, scales, g, torch.bfloat16))
        row = {"tile": tile, "warps": warps, "quantize_gbs": q_bytes / q_ms / 1e6,
               "dequantize_gbs": q_bytes / d_ms / 1e6, "bytes_equal": exact, "finite": bool(y.isfinite().all())}  # fmt: skip
        rows.append(row)
        print(f"tile {tile:5d} warps {warps}: quantize {row['quantize_gbs']:7.0f} GB/s, "
              f"dequantize {row['dequantize_gbs']:7.0f} GB/s, bytes equal {exact}", flush=True)  # fmt: skip
    for name, value in defaults.items():
        setattr(triton_fp4, name, value)
    write_json_atomic(
        args.out, {"machine": machine(), "elements": elements, "defaults": defaults, "rows": rows}
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
