"""The report of ``fp4kv run``: per format what FP4/FP8 KV does to the model, in one JSON, one
table and one PNG under the preset's ``out`` folder.

Per format: teacher-forced KL and top-1 against the bf16 cache, K and V relative error (mean and
per layer), bytes per token against bf16 storage (also when the model computes in fp32), tokens
per GiB, GSM8K accuracy; then the export -> inspect convention check, each phase's seconds and
where the results and the model are.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from fp4kv_cli import __version__
from fp4kv_cli.atomic import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from fp4kv_cli.pipeline.preset import Preset
    from fp4kv_cli.pipeline.run import Outcome

GIB = 1 << 30
#: Relative difference between the calibrated amax and the amax inspect reads back from the
#: exported scales (in the convention it detects) that still counts as the same: one bf16 step,
#: since export rounds each scale up to a bf16 value (engines may hold scales in bf16).
AMAX_TOLERANCE = 2.0**-7
#: A bf16 GSM8K accuracy below this says the model cannot do the task at all.
NO_SKILL = 0.05


def build_report(preset: Preset, outcome: Outcome) -> dict[str, Any]:
    """The ``report.json`` dict."""
    import torch
    import transformers

    summary = outcome.summary
    report: dict[str, Any] = {
        "schema": "fp4kv.run_report",
        "version": 1,
        "preset": preset.name,
        "description": preset.description,
        "model": {"source": outcome.model_source, "loaded_from": outcome.model},
        "results_dir": str(outcome.out),
        "files": _files(outcome),
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {"fp4kv": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "phases": outcome.phases,
        "wall_seconds": outcome.phases["total"]["seconds"],
        "convention_check": convention_check(outcome.export_report, outcome.inspect_report),
    }
    if summary is not None:
        report["eval"] = _eval_part(summary)
    return report


def _files(outcome: Outcome) -> dict[str, str | None]:
    eval_dir = outcome.out / "eval"
    return {
        "report_json": str(outcome.out / "report.json"),
        "report_png": str(outcome.out / "report.png"),
        "model": outcome.model,
        "scales": None if outcome.scales is None else str(outcome.scales),
        "export": None if outcome.export_dir is None else str(outcome.export_dir),
        "inspect": str(outcome.out / "inspect.json") if outcome.inspect_report is not None else None,
        "eval_summary": str(eval_dir / "summary.json") if outcome.summary is not None else None,
    }


def convention_check(export: dict[str, Any] | None, inspected: dict[str, Any] | None) -> dict[str, Any] | None:
    """Whether ``inspect`` of the export reads back the convention and the amax export wrote:
    ``ok`` when the conventions agree and every layer's amax matches within
    :data:`AMAX_TOLERANCE`. Inspect's hazards (what other engines or targets would make of these
    scales, an offset engines ignore) are listed beside it."""
    if export is None or inspected is None:
        return None
    worst = 0.0
    for wrote, read in zip(export["layers"], inspected["layers"]):
        for key in ("k_amax", "v_amax"):
            if read.get(key) is None:
                worst = float("inf")
                continue
            worst = max(worst, abs(read[key] - wrote[key]) / max(abs(wrote[key]), 1e-30))
    same = export["convention"] == inspected["convention"]
    layers_match = len(export["layers"]) == len(inspected["layers"])
    return {
        "kv_dtype": export["kv_dtype"],
        "format": export["format"],
        "exported_convention": export["convention"],
        "inspected_convention": inspected["convention"],
        "inspect_basis": inspected.get("basis"),
        "max_amax_rel_diff": worst,
        "hazards": list(inspected["hazards"]),
        "export_warnings": list(export.get("warnings", [])),
        "ok": same and layers_match and worst <= AMAX_TOLERANCE,
    }


def _eval_part(summary: dict[str, Any]) -> dict[str, Any]:
    shape = summary["kv_shape"]
    bf16_bytes = summary["bf16_kv_bytes_per_token"]
    formats = {}
    for kv, r in summary["results"].items():
        fid = r.get("fidelity")
        k_err = None if fid is None else fid["k_rel_error"]
        v_err = None if fid is None else fid["v_rel_error"]
        formats[kv] = {
            "scale_source": r["scale_source"],
            "k_centering": r["k_centering"],
            "kl": None if fid is None else fid["kl"],
            "top1": None if fid is None else fid["top1"],
            "k_rel_error_mean": None if k_err is None else sum(k_err) / len(k_err),
            "v_rel_error_mean": None if v_err is None else sum(v_err) / len(v_err),
            "k_rel_error": k_err,
            "v_rel_error": v_err,
            "bytes_per_token": r["kv_bytes_per_token"],
            "bytes_vs_bf16": r["kv_bytes_per_token"] / bf16_bytes,
            "tokens_per_gib": GIB // r["kv_bytes_per_token"],
            "gsm8k_strict": r["accuracy"]["strict"],
            "gsm8k_flexible": r["accuracy"]["flexible"],
            "generation_seconds": r["generation_seconds"],
            "decode_attention": r["decode_attention"],
        }
    return {
        "task": f"GSM8K {summary['prompt']}, first {summary['num_questions']} test questions, "
        f"greedy, at most {summary['max_new_tokens']} new tokens",
        "gsm8k_note": gsm8k_note(summary),
        "fidelity_samples": next((f["fidelity"]["samples"] for f in summary["results"].values() if f.get("fidelity")), None),
        "fidelity_tokens": next((f["fidelity"]["tokens"] for f in summary["results"].values() if f.get("fidelity")), None),
        "reference": "bf16 KV storage (the fidelity reference and 1.0x bytes)",
        "bf16_bytes_per_token": bf16_bytes,
        "kv_shape": shape,
        "device": summary["device"],
        "dtype": summary["dtype"],
        "eval_wall_seconds": summary.get("wall_seconds"),
        "formats": formats,
    }


def gsm8k_note(summary: dict[str, Any]) -> str:
    """What GSM8K accuracy means for this run: when the bf16 cache itself scores near 0, or on a
    few questions, it shows that generation runs end to end, not how the formats compare (KL and
    top-1 do that)."""
    n = summary["num_questions"]
    reasons = []
    bf16 = summary["results"].get("bf16")
    if bf16 is not None and bf16["accuracy"]["strict"]["mean"] < NO_SKILL:
        correct = bf16["accuracy"]["strict"]["correct"]
        reasons.append(f"bf16 KV itself scores {correct}/{n}: this model cannot do GSM8K")
    if n < 200:
        reasons.append(f"{n} questions give 95% intervals tens of points wide")
    if not reasons:
        return "GSM8K accuracy with the KV cache stored in each format (paired differences in eval/summary.json)"
    return "; ".join(reasons) + "; so this accuracy only checks that generation runs: compare formats by KL and top-1"


def report_table(report: dict[str, Any]) -> Table:
    """Per format: KL, top-1, K/V error, bytes and tokens per GiB, GSM8K; caption: the checks."""
    ev = report["eval"]
    check = report["convention_check"]
    caption = [f"KL and top-1 vs bf16 KV over {ev['fidelity_tokens']} teacher-forced tokens "
               f"({ev['fidelity_samples']} questions); K/V error = ||deq(q(x)) - x|| / ||x||, mean over layers"]  # fmt: skip
    caption.append(f"GSM8K: {ev['gsm8k_note']}")
    if check is not None:
        verdict = "OK" if check["ok"] else "MISMATCH"
        caption.append(
            f"export -> inspect ({check['kv_dtype']}, {check['format']}): {verdict}, convention "
            f"{check['exported_convention']} written, {check['inspected_convention']} read back, "
            f"amax max rel diff {check['max_amax_rel_diff']:.1e}; inspect lists {len(check['hazards'])} hazards "
            "for other consumers (inspect.json)"
        )
    table = Table(title=f"{report['preset']}: {report['model']['source']} ({ev['device']}, {ev['dtype']})",
                  caption="\n".join(caption))  # fmt: skip
    for column in ("kv", "scales", "KL", "top-1", "K err", "V err", "B/token", "vs bf16", "tokens/GiB", "GSM8K strict"):
        table.add_column(column, justify="left" if column in ("kv", "scales") else "right")
    for kv, f in ev["formats"].items():
        acc = f["gsm8k_strict"]
        table.add_row(
            kv,
            f["scale_source"] + (" +center" if f["k_centering"] else ""),
            _num(f["kl"], ".4f"),
            _num(f["top1"], ".1%"),
            _num(f["k_rel_error_mean"], ".3f"),
            _num(f["v_rel_error_mean"], ".3f"),
            f"{f['bytes_per_token']:,}",
            f"{f['bytes_vs_bf16']:.3f}x",
            f"{f['tokens_per_gib']:,}",
            f"{acc['correct']}/{acc['n']} [{acc['ci95'][0]:.0%}, {acc['ci95'][1]:.0%}]",
        )
    return table


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """``report.png``: KL and top-1, K/V error per layer, tokens per GiB, GSM8K accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = report["eval"]
    names = list(ev["formats"])
    rows = [ev["formats"][kv] for kv in names]
    colors = [plt.get_cmap("tab10")(i) for i in range(len(names))]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    quantized = [(n, r, c) for n, r, c in zip(names, rows, colors) if r["kl"] is not None and r["kl"] > 0]
    if quantized:
        ax.bar([n for n, _, _ in quantized], [r["kl"] for _, r, _ in quantized], color=[c for _, _, c in quantized])
        ax.set_yscale("log")
        for i, (_, r, _) in enumerate(quantized):
            ax.annotate(f"top-1 {r['top1']:.1%}", (i, r["kl"]), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("mean KL(bf16 || kv) per token [nats], log")
    ax.set_title(f"teacher-forced fidelity vs bf16 KV ({ev['fidelity_tokens']} tokens)")
    ax = axes[0][1]
    for name, r, color in zip(names, rows, colors):
        if r["k_rel_error"] is None or r["kl"] == 0:
            continue
        layers = range(len(r["k_rel_error"]))
        ax.plot(layers, r["k_rel_error"], "-", color=color, label=f"{name} K")
        ax.plot(layers, r["v_rel_error"], "--", color=color, label=f"{name} V")
    ax.set_xlabel("layer")
    ax.set_ylabel("||deq(q(x)) - x|| / ||x||")
    ax.set_title("K (solid) and V (dashed) relative error per layer")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    ax = axes[1][0]
    ax.bar(names, [r["tokens_per_gib"] / 1e6 for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.annotate(f"{1 / r['bytes_vs_bf16']:.2f}x", (i, r["tokens_per_gib"] / 1e6), ha="center", va="bottom")
    ax.set_ylabel("tokens per GiB of KV cache [millions]")
    ax.set_title(f"capacity (bf16 = {ev['bf16_bytes_per_token']:,} B/token)")
    ax = axes[1][1]
    means = [r["gsm8k_strict"]["mean"] for r in rows]
    low = [max(0.0, m - r["gsm8k_strict"]["ci95"][0]) for m, r in zip(means, rows)]
    high = [max(0.0, r["gsm8k_strict"]["ci95"][1] - m) for m, r in zip(means, rows)]
    ax.bar(names, means, yerr=[low, high], capsize=4, color=colors)
    ax.set_ylim(0, 1)
    ax.set_ylabel("GSM8K strict accuracy (95% CI)")
    ax.set_title(f"GSM8K, {rows[0]['gsm8k_strict']['n']} questions")
    ax.text(0.5, 0.93, "\n".join(_wrap(ev["gsm8k_note"], 60)), transform=ax.transAxes, ha="center", va="top", fontsize=8)
    fig.suptitle(f"{report['preset']}: {Path(report['model']['source']).name}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def write_report(preset: Preset, outcome: Outcome) -> dict[str, Any]:
    """Write ``report.json`` (and ``report.png`` when the eval ran); returns the report."""
    report = build_report(preset, outcome)
    write_json_atomic(outcome.out / "report.json", report)
    if "eval" in report:
        plot_report(report, outcome.out / "report.png")
    else:
        report["files"]["report_png"] = None
        write_json_atomic(outcome.out / "report.json", report)
    return report
