"""Peak memory of one prefill through the quantized cache, chunked and in one forward.

Each configuration runs in a fresh subprocess (so CPU peak RSS is its own) and reports the
peak above the loaded model: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU (Linux) the
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after loading) minus the
resident set before the prefill. Prompts are random token ids (no padding).

    python3 scripts/prefill_memory.py --model DIR --batch 8 --tokens 2048 --kv nvfp4 \\
        --chunks 0,2048,8192 --out mem.json      # 0 = one forward
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def measure(model_path: str, batch: int, tokens: int, kv: str, chunk: int, device: str) -> dict:
    """Peak bytes of one prefill of ``batch x tokens`` in format ``kv`` (chunk 0: one forward)."""
    from fp4kv_cli.cache import QuantKVCache
    from fp4kv_cli.evaluate.prefill import chunked_prefill
    from fp4kv_cli.evaluate.runner import kv_method
    from fp4kv_cli.models import load_model_and_tokenizer

    dev = torch.device(device)
    model, _ = load_model_and_tokenizer(model_path, dev, "auto")
    dtype = next(model.parameters()).dtype
    ids = torch.randint(
        10, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0)
    )
    ids, mask = ids.to(dev), torch.ones_like(ids).to(dev)
    cache = QuantKVCache.for_model(model.config, kv_method(kv, dtype), capacity_hint=tokens)
    before = _reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    try:
        chunked_prefill(model, cache, ids, mask, chunk or batch * tokens)
    except torch.cuda.OutOfMemoryError:
        return {"batch": batch, "tokens": tokens, "kv": kv, "prefill_chunk": chunk or None, "device": device,
                "peak_bytes_above_model": None, "out_of_memory": True}  # fmt: skip
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - before
    return {"batch": batch, "tokens": tokens, "kv": kv, "prefill_chunk": chunk or None, "device": device,
            "peak_bytes_above_model": peak, "kv_capacity_bytes": cache.capacity_bytes(),
            "seconds": time.perf_counter() - start}  # fmt: skip


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak_rss() -> int:
    """Reset the process's peak resident set (``VmHWM``) to its current size; returns that size."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--kv", default="nvfp4")
    parser.add_argument("--chunks", default="0,4096", help="comma-separated budgets; 0 = one forward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one chunk here
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.model, args.batch, args.tokens, args.kv, args.one, args.device)))
        return
    rows = []
    for chunk in (int(c) for c in args.chunks.split(",")):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--tokens",
               str(args.tokens), "--kv", args.kv, "--device", args.device, "--one", str(chunk)]  # fmt: skip
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"prefill chunk {chunk} failed:\n{done.stderr[-2000:]}")
        row = json.loads(done.stdout.splitlines()[-1])
        rows.append(row)
        if row.get("out_of_memory"):
            print(f"chunk {chunk or 'one forward':>11}: out of memory")
            continue
        print(f"chunk {chunk or 'one forward':>11}: peak {row['peak_bytes_above_model'] / 2**20:8.1f} MiB above "
              f"the model (KV buffers {row['kv_capacity_bytes'] / 2**20:.1f} MiB), {row['seconds']:.1f} s")  # fmt: skip
    if args.out:
        from fp4kv_cli.atomic import write_json_atomic

        write_json_atomic(args.out, {"runs": rows})


if __name__ == "__main__":
    main()
