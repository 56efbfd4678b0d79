"""The accuracy table of ``docs/accuracy.md`` from ``fp4kv eval gsm8k`` run folders.

Reads each run's ``samples-<kv>.jsonl`` and ``fidelity.json`` (complete or cut short by a time
limit: a partial format is reported with its ``n``) and prints one markdown row per format:
strict / flexible accuracy with the Wilson 95% interval, the paired strict difference vs the
run's own bf16 on the same questions, fidelity KL / top-1, KV bytes per token and generation
seconds (sum of batch wall times). ``--out`` also saves the figures and every question's
correct flags (compact strings, index order) so paired differences can be recomputed later
without the multi-megabyte sample logs.

usage: python scripts/accuracy_table.py RUN_DIR [RUN_DIR ...] [--out accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.evaluate.metrics import accuracy, paired_difference

REFERENCE = "bf16"


def load_samples(run: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """``{kv: {question index: record}}`` of every ``samples-<kv>.jsonl`` in ``run``."""
    samples = {}
    for path in sorted(run.glob("samples-*.jsonl")):
        kv = path.stem.removeprefix("samples-")
        records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
        samples[kv] = {r["index"]: r for r in records}
    return samples


def summarize(run: Path) -> dict[str, Any]:
    """Figures per format of one run folder."""
    samples = load_samples(run)
    fidelity_path = run / "fidelity.json"
    fidelity = json.loads(fidelity_path.read_text())["results"] if fidelity_path.exists() else {}
    reference = samples.get(REFERENCE)
    rows = {}
    for kv in [REFERENCE, *sorted(k for k in samples if k != REFERENCE)]:
        if kv not in samples:
            continue
        records = samples[kv]
        order = sorted(records)
        strict = [records[i]["strict_correct"] for i in order]
        flexible = [records[i]["flexible_correct"] for i in order]
        row: dict[str, Any] = {
            "n": len(order),
            "strict": accuracy(strict).to_dict(),
            "flexible": accuracy(flexible).to_dict(),
            "kv_bytes_per_token": records[order[0]]["kv_bytes_per_token"],
            "generation_seconds": sum(r["seconds"] for r in records.values()),
            "new_tokens": sum(r["new_tokens"] for r in records.values()),
            "strict_flags": "".join("1" if f else "0" for f in strict),
            "indices": order,
        }
        if reference is not None and all(i in reference for i in order):
            row["paired_strict_vs_bf16"] = paired_difference(
                strict, [reference[i]["strict_correct"] for i in order]
            ).to_dict()
        if kv in fidelity:
            row["kl"], row["top1"] = fidelity[kv]["kl"], fidelity[kv]["top1"]
        rows[kv] = row
    return {"run": run.name, "formats": rows}


def markdown_row(run: str, kv: str, row: dict[str, Any]) -> str:
    """One table row: run, format, n, strict (CI), flexible, paired diff (CI), KL, top-1, B/token, s."""
    lo, hi = row["strict"]["ci95"]
    diff = row.get("paired_strict_vs_bf16")
    diff_text = "-" if diff is None or kv == REFERENCE else (
        f"{100 * diff['mean']:+.1f} ({100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f})"
    )  # fmt: skip
    kl = f"{row['kl']:.4f}" if "kl" in row else "-"
    top1 = f"{100 * row['top1']:.1f}%" if "top1" in row else "-"
    return (
        f"| {run} | {kv} | {row['n']} | {100 * row['strict']['mean']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) "
        f"| {100 * row['flexible']['mean']:.1f} | {diff_text} | {kl} | {top1} "
        f"| {row['kv_bytes_per_token']:,} | {row['generation_seconds']:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs = [summarize(run) for run in args.runs]
    print("| run | KV | n | strict % (95% CI) | flexible % | paired strict diff vs bf16, pts (95% CI) "
          "| KL | top-1 | KV B/token | gen s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for kv, row in run["formats"].items():
            print(markdown_row(run["run"], kv, row))
    if args.out:
        write_json_atomic(args.out, {"runs": runs})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
