"""``fp4kv export-scales``: write calibrated KV scales in the layout and convention engines load."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from fp4kv_cli.cli.app import app, console, guarded


@app.command("export-scales")
@guarded
def export_scales_cmd(
    scales: Annotated[
        Path,
        typer.Argument(help="scales.json from fp4kv calibrate, or a checkpoint folder that has KV scales."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output model folder (json: output file); must not exist.")
    ],
    kv_dtype: Annotated[
        str, typer.Option("--kv-dtype", help="KV cache dtype the scales are for: nvfp4, nvfp4_4over6 or fp8.")
    ],
    fmt: Annotated[str, typer.Option("--format", help="modelopt, compressed-tensors, fp8 (into a transformers fine-grained FP8 checkpoint) or json.")],
    model_dir: Annotated[
        Path | None,
        typer.Option(
            "--model-dir", "-m", help="Model folder to export into (default: SCALES if it is a folder)."
        ),
    ] = None,
    convention: Annotated[
        str | None,
        typer.Option("--convention", help="448 (amax/448) or 6x448 (amax/2688); default from --target."),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="GPU the engine runs on: sm90, sm100 or sm120.")
    ] = None,
    engine: Annotated[
        str | None, typer.Option("--engine", help="sglang (default with --target), vllm or trtllm.")
    ] = None,
    force_convention: Annotated[
        bool,
        typer.Option("--force-convention", help="Write --convention even where it contradicts --target."),
    ] = False,
    source_convention: Annotated[
        str | None,
        typer.Option(
            "--source-convention", help="Convention of a source checkpoint whose metadata is ambiguous."
        ),
    ] = None,
    per_head: Annotated[
        bool, typer.Option("--per-head/--per-tensor", help="Per-head scales where the format supports them.")
    ] = True,
    k_centering: Annotated[
        str,
        typer.Option(
            "--k-centering",
            help="none: K scales cover raw K; plugin: K scales of centered K + fp4kv's offsets, served by "
            "the fp4kv vLLM plugin; modelopt: the same in ModelOpt's affine naming (k_proj.k_bias, no "
            "engine reads it). Needs a scales file from calibrate --center-k.",
        ),
    ] = "none",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Export KV scales (ModelOpt, compressed-tensors or a JSON sidecar) and show what engines will use."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.export.exporter import ExportRequest, export_scales
    from fp4kv_cli.export.report import report_tables

    result = export_scales(
        ExportRequest(
            scales=scales,
            out=out,
            kv_dtype=kv_dtype,
            fmt=fmt,
            model_dir=model_dir,
            convention=convention,
            engine=engine,
            target=target,
            overwrite=overwrite,
            force_convention=force_convention,
            source_convention=source_convention,
            per_head=per_head,
            k_centering=k_centering.strip().lower(),
        )
    )
    report = result.report
    console.print(f"[bold]convention {report['convention']}[/]: {report['reason']}", highlight=False)
    for table in report_tables(report, console):
        console.print(table)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    counts = Counter(f.how for f in result.files)
    summary = ", ".join(f"{n} {how}" for how, n in sorted(counts.items()))
    console.print(f"wrote {out} ({summary}); report {result.report_path}", highlight=False)
