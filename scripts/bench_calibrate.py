"""Throughput of ``fp4kv calibrate``'s capture against a plain forward on the same batches.

Three forwards per batch, in rotating order so all see the same machine load:

- ``plain``: what ``model(**batch)`` does by default (``use_cache=True``: a ``DynamicCache``);
- ``no_cache``: the same with ``use_cache=False`` (nothing stored);
- ``capture``: the recording cache plus every statistic calibrate keeps, and its per-batch sync.

Figures are real tokens per second over all timed batches, and the median over batches of the
per-batch time ratio (robust to load spikes on a shared machine); the overhead is capture vs plain.

usage: python scripts/bench_calibrate.py --model M [--device auto] [--dtype auto] [--num-samples 64]
       [--seq-len 512] [--batch-size 8] [--repeats 3] [--threads N] [--out bench_calibrate.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers
from transformers import DynamicCache

from fp4kv_cli import __version__
from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.calibration.capture import Batch, RecordingCache, forward_kwargs, make_batches, tokenize
from fp4kv_cli.calibration.stats import KVStatistics, RealTokens
from fp4kv_cli.data import load_texts
from fp4kv_cli.models import DTYPE_NAMES, load_model_and_tokenizer


def machine() -> dict[str, str | int]:
    """Where the figures come from: host, CPU/GPU, library versions."""
    info: dict[str, str | int] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fp4kv": __version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODES = ("plain", "no_cache", "capture")


def timed_forward(
    model: torch.nn.Module, batch: Batch, device: torch.device, mode: str, stats: KVStatistics
) -> float:
    """Seconds for one forward of ``batch`` in ``mode`` (``capture`` folds into ``stats``)."""
    synchronize(device)
    start = time.perf_counter()
    cache = None
    if mode == "plain":
        cache = DynamicCache(config=model.config)
    elif mode == "capture":
        stats.start_batch(RealTokens.from_mask(batch.attention_mask, device))
        cache = RecordingCache(model.config, stats.record)
    with torch.inference_mode():
        model(**forward_kwargs(model, batch, device, cache))
    if mode == "capture":
        stats.finish_batch()  # folds every layer in, with the per-batch host sync calibrate does
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    """Parse arguments, run the interleaved benchmark, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("bench_calibrate.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model_and_tokenizer(args.model, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    sequences = tokenize(tokenizer, load_texts(num_samples=args.num_samples), args.seq_len)
    batches = list(make_batches(sequences, args.batch_size, tokenizer.pad_token_id))
    tokens = sum(batch.num_tokens for batch in batches)
    # One statistics object for the whole run, as calibrate has: its buffers are allocated once,
    # during the warm-up (allocator, kernels), not inside the timed batches.
    stats = KVStatistics(total_tokens=batches[0].num_tokens + tokens * args.repeats)
    for mode in MODES:
        timed_forward(model, batches[0], device, mode, stats)
    seconds = dict.fromkeys(MODES, 0.0)
    ratios: dict[str, list[float]] = {"plain": [], "no_cache": []}
    for repeat in range(args.repeats):
        for number, batch in enumerate(batches):
            shift = (repeat + number) % len(MODES)
            times = {}
            for mode in MODES[shift:] + MODES[:shift]:
                times[mode] = timed_forward(model, batch, device, mode, stats)
                seconds[mode] += times[mode]
            for base, values in ratios.items():
                values.append(times["capture"] / times[base])
    total = tokens * args.repeats
    result = {
        "machine": machine(),
        "model": args.model,
        "device": str(device),
        "dtype": DTYPE_NAMES.get(model.dtype, str(model.dtype)),
        "num_samples": len(sequences),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tokens_per_repeat": tokens,
        "tokens_per_s": {mode: total / seconds[mode] for mode in MODES},
        "capture_overhead_pct": 100.0 * (seconds["capture"] - seconds["plain"]) / seconds["plain"],
        "capture_overhead_vs_no_cache_pct": 100.0
        * (seconds["capture"] - seconds["no_cache"])
        / seconds["no_cache"],
        "median_batch_overhead_pct": {base: 100.0 * (statistics.median(r) - 1) for base, r in ratios.items()},
    }
    for key, value in result["machine"].items():
        print(f"{key:>22}: {value}")
    for key in (
        "model",
        "device",
        "dtype",
        "num_samples",
        "seq_len",
        "batch_size",
        "repeats",
        "tokens_per_repeat",
    ):
        print(f"{key:>22}: {result[key]}")
    for mode in MODES:
        print(f"{mode + ' tok/s':>22}: {result['tokens_per_s'][mode]:,.1f}")
    print(f"{'capture vs plain':>22}: {result['capture_overhead_pct']:+.2f} %")
    print(f"{'capture vs no_cache':>22}: {result['capture_overhead_vs_no_cache_pct']:+.2f} %")
    for base, value in result["median_batch_overhead_pct"].items():
        print(f"{'median/batch vs ' + base:>22}: {value:+.2f} %")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
