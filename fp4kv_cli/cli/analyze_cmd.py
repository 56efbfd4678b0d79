"""``fp4kv analyze``: per-layer/head sensitivity to a KV format, K error decomposition, and a
mixed-format recipe under a bytes-per-element budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fp4kv_cli.cli.app import (
    WRITE_RECIPE_HELP,
    BudgetOption,
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    KlBudgetOption,
    MaxMemoryOption,
    app,
    console,
    err_console,
    guarded,
)
from fp4kv_cli.validate import check_output_path


@app.command("analyze")
@guarded(oom_fix="lower --samples, or use --dtype bf16")
def analyze(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder, .gguf file or hub id.")],
    scales: Annotated[str, typer.Option("--scales", help="scales.json from fp4kv calibrate (--center-k).")],
    format: Annotated[
        str, typer.Option("--format", help="KV format whose sensitivity is measured.")
    ] = "nvfp4",
    upgrade: Annotated[
        str, typer.Option("--upgrade", help="Format the recipe moves the most sensitive tensors to.")
    ] = "fp8",
    budget: BudgetOption = 0.6,
    kl_budget: KlBudgetOption = 0.001,
    samples: Annotated[
        int, typer.Option("--samples", help="GSM8K test questions (5-shot prompt + gold answer).")
    ] = 8,
    per_head: Annotated[
        bool, typer.Option("--per-head/--no-per-head", help="Also one K run per (layer, KV head).")
    ] = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    out: Annotated[
        str, typer.Option("--out", help="Folder for analysis.json and the heat map.")
    ] = "analysis",
    write_recipe: Annotated[str | None, typer.Option("--write-recipe", help=WRITE_RECIPE_HELP)] = None,
) -> None:
    """Where --format loses accuracy (teacher-forced KL vs bf16), and a recipe that upgrades the worst tensors."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.analysis.analyze import ANALYSIS_JSON, HEATMAP_PNG, AnalyzeSettings, run_analysis

    check_output_path(Path(out) / ANALYSIS_JSON, "--out")
    if write_recipe is not None:
        check_output_path(write_recipe, "--write-recipe")

    settings = AnalyzeSettings(
        model=model,
        scales=scales,
        format=format,
        upgrade=upgrade,
        budget=budget,
        kl_budget=kl_budget,
        samples=samples,
        per_head=per_head,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        out=out,
        write_recipe=write_recipe,
    )
    result = run_analysis(settings, err_console)
    console.print(layer_table(result))
    console.print(validation_table(result))
    for note in result["recipe"]["notes"]:
        console.print(f"  {note}", highlight=False)
    console.print(f"results in {out}/ ({ANALYSIS_JSON}, {HEATMAP_PNG})", highlight=False)
    if write_recipe is not None:
        console.print(
            f"recipe written to {write_recipe}; run it with fp4kv eval gsm8k --scales {write_recipe} "
            "--kv-dtype bf16,recipe",
            highlight=False,
        )


def layer_table(result: dict[str, Any]) -> Table:
    """Per-layer sensitivity, K decomposition and the chosen formats."""
    fmt = result["settings"]["format"]
    table = Table(
        title=f"{fmt} sensitivity per layer ({result['samples']} samples, {result['tokens']} answer tokens)",
        caption="KL vs bf16 (nats/token) with only that tensor in "
        f"{fmt}; K var err: error in K's token-varying part, raw / centered (mean over heads)",
    )
    for column in ("layer", "K KL", "K KL centered", "V KL", "K top-1", "V top-1", "worst head KL",
                   "K const share", "K var err", "recipe K/V"):  # fmt: skip
        table.add_column(column, justify="right")
    for layer in result["layers"]:
        dec = layer["k_decomposition"]
        heads = layer["k_heads"]
        table.add_row(
            str(layer["index"]),
            f"{layer['k']['kl']:.4f}",
            "-" if layer["k_centered"] is None else f"{layer['k_centered']['kl']:.4f}",
            f"{layer['v']['kl']:.4f}",
            f"{layer['k']['top1']:.1%}",
            f"{layer['v']['top1']:.1%}",
            "-" if heads is None else f"{max(h['kl'] for h in heads):.4f}",
            f"{_mean(dec['constant_share']):.2f}",
            f"{_mean(dec['varying_error']):.3f} / {_mean(dec['varying_error_centered']):.3f}",
            f"{layer['recipe']['k']}/{layer['recipe']['v']}",
        )
    return table


def validation_table(result: dict[str, Any]) -> Table:
    """The recipe against the all-format and all-upgrade caches."""
    table = Table(title="recipe validation (whole cache, teacher-forced)")
    for column in ("cache", "bytes/elem", "KV B/token", "KL", "top-1"):
        table.add_column(column, justify="left" if column == "cache" else "right")
    for label, row in result["validation"].items():
        table.add_row(
            label,
            f"{row['bytes_per_element']:.4f}",
            f"{row['kv_bytes_per_token']:,} ({row['kv_bytes_per_token_vs_bf16']:.3f}x)",
            f"{row['kl']:.4f}",
            f"{row['top1']:.1%}",
        )
    return table


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
