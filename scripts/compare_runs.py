"""Paired GSM8K comparisons across ``fp4kv eval gsm8k`` runs, from ``accuracy_table.py --out`` files.

``accuracy_table.py`` pairs each format with the bf16 of its own run. This script pairs any two
(run, format) entries on the questions both answered (e.g. the same format read two ways, or bf16
read by SDPA vs by the decode-attention kernel), and pools several runs: per question, the mean
strict-correct flag of group A minus that of group B, with a normal 95% interval over questions
(e.g. nvfp4 read two ways vs bf16 read the same two ways). Prints markdown rows, saves JSON.

usage: python scripts/compare_runs.py ACCURACY.json [...] [--pair RUN:KV RUN:KV]...
       [--pooled RUN:KV,RUN:KV RUN:KV,RUN:KV]... [--out comparisons.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.evaluate.metrics import mean_interval


def load_flags(paths: list[str]) -> dict[str, dict[int, bool]]:
    """``{"run:kv": {question index: strict correct}}`` from accuracy_table.py JSON files."""
    flags = {}
    for path in paths:
        for run in json.loads(Path(path).read_text())["runs"]:
            for kv, figures in run["formats"].items():
                if "strict_flags" in figures:
                    values = (c == "1" for c in figures["strict_flags"])
                    flags[f"{run['run']}:{kv}"] = dict(zip(figures["indices"], values))
    return flags


def pooled_difference(flags: dict[str, dict[int, bool]], group_a: list[str], group_b: list[str]) -> dict:
    """Mean over shared questions of (mean flag of ``group_a``) - (mean flag of ``group_b``)."""
    missing = [name for name in group_a + group_b if name not in flags]
    if missing:
        raise SystemExit(f"error: no flags for {', '.join(missing)}; known: {', '.join(sorted(flags))}")
    shared = sorted(set.intersection(*(set(flags[name]) for name in group_a + group_b)))
    if not shared:
        raise SystemExit(f"error: {', '.join(group_a + group_b)} share no question")
    diffs = [
        statistics.mean(flags[a][i] for a in group_a) - statistics.mean(flags[b][i] for b in group_b)
        for i in shared
    ]
    mean, ci = mean_interval(diffs)
    return {
        "a": group_a,
        "b": group_b,
        "n": len(diffs),
        "mean": mean,
        "ci95": None if ci is None else list(ci),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="accuracy_table.py --out files")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar="RUN:KV")
    parser.add_argument("--pooled", nargs=2, action="append", default=[], metavar="RUN:KV,...")
    parser.add_argument("--out")
    args = parser.parse_args()
    flags = load_flags(args.tables)
    comparisons = [pooled_difference(flags, [a], [b]) for a, b in args.pair]
    comparisons += [pooled_difference(flags, a.split(","), b.split(",")) for a, b in args.pooled]
    print("| A | B | n | strict A - B, pts (95% CI) |\n|---|---|---:|---|")
    for c in comparisons:
        interval = "" if c["ci95"] is None else " ({:+.1f}, {:+.1f})".format(*(100 * x for x in c["ci95"]))
        difference = f"{100 * c['mean']:+.1f}{interval}"
        print(f"| {' + '.join(c['a'])} | {' + '.join(c['b'])} | {c['n']} | {difference} |")
    if args.out:
        write_json_atomic(Path(args.out), {"tables": args.tables, "comparisons": comparisons})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
