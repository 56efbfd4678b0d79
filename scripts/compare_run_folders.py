"""Whether two ``fp4kv eval gsm8k`` run folders hold the same results, and their wall seconds.

Made for a data-parallel run against a one-process run, or a model split over GPUs against one
GPU. Compared: per KV format the ``samples-<kv>.jsonl`` records line by line (every field but
the timing ones, :data:`RECORD_TIMING`), ``fidelity.json``, and ``summary.json`` but for the
fields that time or place the run (:data:`SUMMARY_RUN_FIELDS`, :data:`RESULT_TIMING`). Prints one
line per format (rows, identical rows, rows whose output differs, the first such indices) and the
wall seconds of each run with their ratio; exit status 0 when everything compared is identical.

usage: python scripts/compare_run_folders.py RUN_A RUN_B [--out comparison.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp4kv_cli.atomic import write_json_atomic

#: Sample record fields that time the batch or measure the device's allocator.
RECORD_TIMING = ("seconds", "peak_gpu_bytes")
#: Per-format summary fields of the same kind (``auto_batch`` holds the free memory it found).
RESULT_TIMING = ("generation_seconds", "tokens_per_second", "peak_gpu_bytes", "auto_batch")
#: Run-level summary fields: wall time, sessions, processes and where the run folder is.
SUMMARY_RUN_FIELDS = ("wall_seconds", "wall_seconds_session", "sessions", "processes", "run_dir")


def _records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [{k: v for k, v in json.loads(line).items() if k not in RECORD_TIMING} for line in lines]


def _summary(run: Path) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    results = {
        kv: {k: v for k, v in result.items() if k not in RESULT_TIMING}
        for kv, result in summary["results"].items()
    }
    return {**{k: v for k, v in summary.items() if k not in SUMMARY_RUN_FIELDS}, "results": results}


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths (``.results.nvfp4.accuracy``) where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            path
            for key in dict.fromkeys([*a, *b])
            for path in _differences(a.get(key), b.get(key), f"{where}.{key}")
        ]
    return [] if a == b else [where or "."]


def compare(run_a: Path, run_b: Path) -> dict[str, Any]:
    """The comparison of two run folders (see the module docstring) as a JSON-ready dict."""
    summary_a, summary_b = _summary(run_a), _summary(run_b)
    formats = {}
    for kv in dict.fromkeys([*summary_a["results"], *summary_b["results"]]):
        a, b = _records(run_a / f"samples-{kv}.jsonl"), _records(run_b / f"samples-{kv}.jsonl")
        pairs = list(zip(a, b))
        formats[kv] = {
            "rows": [len(a), len(b)],
            "identical": sum(x == y for x, y in pairs),
            "output_differs": [x["index"] for x, y in pairs if x["output"] != y["output"]],
            "same_order": [(x["index"], x.get("sample", 0)) for x in a]
            == [(y["index"], y.get("sample", 0)) for y in b],
        }
    fidelity = [
        (run / "fidelity.json").read_text() if (run / "fidelity.json").is_file() else None
        for run in (run_a, run_b)
    ]
    walls = [json.loads((run / "summary.json").read_text())["wall_seconds"] for run in (run_a, run_b)]
    result = {
        "runs": [str(run_a), str(run_b)],
        "formats": formats,
        "fidelity_identical": fidelity[0] == fidelity[1],
        "summary_differences": _differences(summary_a, summary_b),
        "wall_seconds": walls,
        "wall_ratio": walls[0] / walls[1] if walls[1] else None,
    }
    result["identical"] = (
        result["fidelity_identical"]
        and not result["summary_differences"]
        and all(f["rows"][0] == f["rows"][1] == f["identical"] and f["same_order"] for f in formats.values())
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, help="also write the comparison as JSON")
    args = parser.parse_args()
    for run in (args.run_a, args.run_b):
        if not (run / "summary.json").is_file():
            print(
                f"error: {run} has no summary.json; pass two finished fp4kv eval gsm8k run folders",
                file=sys.stderr,
            )
            return 2
    result = compare(args.run_a, args.run_b)
    for kv, f in result["formats"].items():
        print(f"{kv}: rows {f['rows'][0]} / {f['rows'][1]}, identical {f['identical']}, output differs on "
              f"{len(f['output_differs'])} {f['output_differs'][:10]}, same order {f['same_order']}")  # fmt: skip
    print(f"fidelity identical: {result['fidelity_identical']}")
    print(f"summary fields that differ: {', '.join(result['summary_differences']) or 'none'}")
    a, b = result["wall_seconds"]
    print(f"wall seconds: {a:.1f} / {b:.1f} (ratio {result['wall_ratio']:.2f})")
    print("IDENTICAL" if result["identical"] else "DIFFERENT")
    if args.out:
        write_json_atomic(args.out, result)
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
