"""The export report: per-layer amax, exported scale, what each consumer uses, as JSON and a table.

The JSON is also the ``--format json`` sidecar (schema ``fp4kv.kv_scales`` v1). For FP8 it
carries a ``kv_cache`` block in the schema SGLang's ``--quantization-param-path`` reads
(``KVCacheQuantSchema`` in sgl-project/sglang ``python/sglang/srt/model_loader/weight_utils.py``:
one scaling factor per layer per TP rank; fp4kv writes rank 0 only, so use it with TP=1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from fp4kv_cli import __version__
from fp4kv_cli.export.conventions import Resolution
from fp4kv_cli.export.plan import ConsumerView, LayerPlan, verdict
from fp4kv_cli.export.source import KVSource
from fp4kv_cli.quant.rotation import QKRotation
from fp4kv_cli.quant.scales import CONVENTION_DIVISORS

SIDECAR_SCHEMA = "fp4kv.kv_scales"
SIDECAR_VERSION = 1
CONVENTION_TEXT = {
    "448": "scale = amax / 448 (FP8 E4M3 max): FP8 KV everywhere, NVFP4 KV in ModelOpt >= 0.42 and TRT-LLM",
    "6x448": "scale = amax / (6 * 448) = amax / 2688 (the NVFP4 global scale): ModelOpt < 0.41, "
    "SGLang NVFP4 KV (sm100 multiplies it by 6, sm120 uses it as is)",
}


def build_report(
    *,
    source: KVSource,
    plans: Sequence[LayerPlan],
    resolution: Resolution,
    views: Sequence[ConsumerView],
    kv_dtype: str,
    fmt: str,
    per_head: bool,
    model_type: str,
    warnings: Sequence[str],
) -> dict[str, Any]:
    """The report / sidecar dict (JSON-ready)."""
    report: dict[str, Any] = {
        "schema": SIDECAR_SCHEMA,
        "version": SIDECAR_VERSION,
        "fp4kv_version": __version__,
        "source": {"kind": source.kind, "path": str(source.path), "description": source.description},
        "model": source.model,
        "model_type": model_type,
        "kv_dtype": kv_dtype,
        "format": fmt,
        "convention": resolution.convention,
        "divisor": CONVENTION_DIVISORS[resolution.convention],
        "convention_text": CONVENTION_TEXT[resolution.convention],
        "reason": resolution.reason,
        "per_head": per_head,
        "layers": [_layer(plan) for plan in plans],
        "consumers": _consumers(views, plans),
        "warnings": list(warnings),
        "qk_rotation": rotation_serving(source.rotation, source.model.get("head_dim")),
    }
    if kv_dtype == "fp8":
        report["kv_cache"] = {
            "dtype": "float8_e4m3fn",
            "scaling_factor": {"0": {str(p.index): max(p.k_scale, p.v_scale) for p in plans}},
        }
    return report


def rotation_serving(rotation: QKRotation | None, head_dim: int | None) -> dict[str, Any] | None:
    """What serving K stored under ``rotation`` takes: the rotation itself, SGLang's flag, and
    ModelOpt's config where it is the same rotation (the full head); None without a rotation."""
    if rotation is None:
        return None
    return {
        **rotation.to_dict(),
        "order": "after RoPE: K centered (k_offset), then rotated; Q rotated; V not",
        "sglang": f"--qkrot-block {rotation.block}",
        "modelopt": "NVFP4_KV_ROTATE_CFG" if head_dim == rotation.block else None,
    }


def _layer(plan: LayerPlan) -> dict[str, Any]:
    return {
        "index": plan.index,
        "k_amax": plan.k_amax,
        "v_amax": plan.v_amax,
        "k_scale": plan.k_scale,
        "v_scale": plan.v_scale,
        "k_scale_per_head": None if plan.k_scale_per_head is None else list(plan.k_scale_per_head),
        "v_scale_per_head": None if plan.v_scale_per_head is None else list(plan.v_scale_per_head),
        "k_amax_centered": plan.k_amax_centered,
        "k_amax_raw": plan.k_amax_raw,
        "k_scale_covers": "centered K" if plan.centered else "raw K",
        "k_offset": None if plan.k_offset is None else [list(row) for row in plan.k_offset],
    }


def _consumers(views: Sequence[ConsumerView], plans: Sequence[LayerPlan]) -> list[dict[str, Any]]:
    """One entry per engine behaviour: targets that treat the scales alike share an entry."""
    groups: dict[tuple[Any, ...], list[ConsumerView]] = {}
    for view in views:
        c = view.consumer
        key = (c.engine, c.factor, c.kernel_divisor, view.reads, view.shared_kv, view.note)
        groups.setdefault(key, []).append(view)
    return [_consumer(group, plans) for group in groups.values()]


def _consumer(group: list[ConsumerView], plans: Sequence[LayerPlan]) -> dict[str, Any]:
    view = group[0]
    consumer = view.consumer
    rows = []
    for plan in plans:
        (k_used, v_used), (k_implied, v_implied) = view.used(plan), view.implied(plan)
        rows.append(
            {
                "index": plan.index,
                "k_used": k_used,
                "v_used": v_used,
                "k_implied_amax": k_implied,
                "v_implied_amax": v_implied,
                "k_verdict": verdict(k_implied, plan.k_amax),
                "v_verdict": verdict(v_implied, plan.v_amax),
            }
        )
    return {
        "engine": consumer.engine,
        "target": "/".join(v.consumer.target for v in group),
        "reads_scales": view.reads,
        "note": view.note,
        "factor": consumer.factor,
        "kernel_divisor": consumer.kernel_divisor,
        "expects": consumer.expects,
        "how": consumer.how,
        "source": consumer.source,
        "layers": rows,
    }


def consumer_problems(report: dict[str, Any]) -> list[str]:
    """One line per consumer whose implied amax differs from the calibrated one."""
    problems = []
    for consumer in report["consumers"]:
        bad = [row for row in consumer["layers"] if row["k_verdict"] != "ok" or row["v_verdict"] != "ok"]
        if bad:
            first = bad[0]
            worst = first["k_verdict"] if first["k_verdict"] != "ok" else first["v_verdict"]
            problems.append(
                f"{consumer['engine']} {consumer['target']}: {len(bad)} layer(s) off, e.g. layer "
                f"{first['index']} {worst}" + ("" if consumer["reads_scales"] else f" ({consumer['note']})")
            )
    return problems


def report_tables(report: dict[str, Any], console: Console) -> list[Table]:
    """:func:`report_table`, or, where ``console`` is too narrow for it, that table in two
    (exported scales; what each engine uses): a number is never wrapped across lines."""
    table = report_table(report)
    if console.measure(table, options=console.options.update_width(10_000)).maximum <= console.width:
        return [table]
    return [report_table(report, consumers=False), report_table(report, exported=False)]


def report_table(report: dict[str, Any], exported: bool = True, consumers: bool = True) -> Table:
    """Rich table: per layer amax and exported scales (``exported``), and per consumer used
    value + implied amax (``consumers``). Numbers never wrap; verdicts wrap at spaces."""
    engines = report["consumers"]
    detailed = len(engines) == 1
    title = (
        f"KV scales ({report['kv_dtype']}, {report['format']}, convention {report['convention']}: "
        f"scale = amax / {report['divisor']:g})"
    )
    if detailed and consumers:
        title += f"; used / implied amax by {engines[0]['engine']} {engines[0]['target']}"
    table = Table(title=title)
    table.add_column("layer", justify="right", no_wrap=True)
    if exported:
        for column in ("K amax", "V amax", "K scale", "V scale"):
            table.add_column(column, justify="right", no_wrap=True)
    for consumer in engines if consumers else []:
        if detailed:
            for column in ("K used", "V used", "K implied", "V implied"):
                table.add_column(column, justify="right", no_wrap=True)
            table.add_column("verdict", min_width=7)
        else:
            table.add_column(f"{consumer['engine']} {consumer['target']}", min_width=8)
    for i, layer in enumerate(report["layers"]):
        cells = [str(layer["index"])]
        if exported:
            cells += [
                f"{layer['k_amax']:.5g}",
                f"{layer['v_amax']:.5g}",
                f"{layer['k_scale']:.6g}",
                f"{layer['v_scale']:.6g}",
            ]
        for consumer in engines if consumers else []:
            row = consumer["layers"][i]
            if detailed:
                cells += [
                    f"{row['k_used']:.6g}",
                    f"{row['v_used']:.6g}",
                    f"{row['k_implied_amax']:.5g}",
                    f"{row['v_implied_amax']:.5g}",
                ]
            cells.append(_verdict_cell(row))
        table.add_row(*cells)
    return table


def _verdict_cell(row: dict[str, Any]) -> str:
    k, v = row["k_verdict"], row["v_verdict"]
    if k == v == "ok":
        return "[green]ok[/]"
    style = "red" if "OVERFLOW" in k + v else "yellow"
    return f"[{style}]K {k}\nV {v}[/]"
