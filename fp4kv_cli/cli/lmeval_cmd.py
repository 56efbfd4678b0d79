"""``fp4kv eval lm-eval``: any lm-eval task with the KV cache stored in each chosen format."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fp4kv_cli.cli.app import DeviceOption, console, err_console, eval_app, guarded
from fp4kv_cli.errors import FP4KVError

TABLE_WIDTH = 170


@eval_app.command("lm-eval")
@guarded
def lm_eval_command(
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks",
            help="Comma-separated lm-eval tasks (names or YAML paths); gsm8k_local is lm-eval's gsm8k over the "
            "shipped GSM8K data.",
        ),
    ],
    model_args: Annotated[
        str,
        typer.Option(
            "--model-args",
            help="lm-eval model_args of the fp4kv model: pretrained=MODEL[,kv_dtype=nvfp4][,scales=FILE]"
            "[,decode_attention=graph][,dtype=...][,max_length=N] ...",
        ),
    ],
    kv_dtype: Annotated[
        str | None,
        typer.Option(
            "--kv-dtype", help="Formats to run one after another (overrides kv_dtype of --model-args)."
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", help="Overrides the tasks' few-shot.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Evaluate only the first N documents per task.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Requests run together.")] = 16,
    device: DeviceOption = "auto",
    out: Annotated[
        str,
        typer.Option(
            "--out", help="lm-eval's result files go to OUT/<kv>/, the side-by-side summary to OUT/."
        ),
    ] = "results/lm-eval",
    include_path: Annotated[
        str | None, typer.Option("--include-path", help="Folder of extra lm-eval task YAMLs.")
    ] = None,
    local_data: Annotated[
        list[str] | None,
        typer.Option(
            "--local-data",
            help="TASK=FOLDER: read that task's splits from FOLDER/<split>.jsonl (.json/.parquet/.csv) instead "
            "of the hub (repeatable).",
        ),
    ] = None,
    log_samples: Annotated[
        bool, typer.Option("--log-samples/--no-log-samples", help="Save lm-eval's per-document samples.")
    ] = True,
    gen_kwargs: Annotated[
        str | None, typer.Option("--gen-kwargs", help="lm-eval gen_kwargs, e.g. max_gen_toks=512.")
    ] = None,
) -> None:
    """lm-eval's evaluator, tasks, filters and metrics on the fp4kv model (needs the lmeval extra)."""
    try:
        from fp4kv_cli.evaluate.harness.run import HarnessSettings, parse_local_data, run_lm_eval
    except ImportError as err:
        raise FP4KVError(f"fp4kv eval lm-eval needs lm-eval ({err}); pip install 'fp4kv[lmeval]'") from None
    from fp4kv_cli.evaluate.runner import parse_kv_dtypes

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not names:
        raise FP4KVError("--tasks is empty; pass e.g. gsm8k_local")
    settings = HarnessSettings(
        model_args=model_args,
        tasks=names,
        kv_dtypes=None if kv_dtype is None else parse_kv_dtypes(kv_dtype),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=device,
        out=out,
        include_path=include_path,
        local_data=parse_local_data(local_data or []),
        log_samples=log_samples,
        gen_kwargs=gen_kwargs,
    )
    summary = run_lm_eval(settings, err_console)
    (console if console.is_terminal else Console(width=TABLE_WIDTH)).print(summary_table(summary))
    console.print(f"results in {summary['out']}/ (summary.json, <kv>/ lm-eval result files)", highlight=False)


def summary_table(summary: dict[str, Any]) -> Table:
    """Every task metric per KV format, with the paired difference vs bf16 where measured."""
    formats = summary["kv_dtypes"]
    paired = summary.get("vs_bf16") or {}
    table = Table(
        title=f"lm-eval, {summary['model_args']}",
        caption="value ± lm-eval stderr; Δ: mean per-document difference vs bf16 [95% CI], MDD at 80% power",
    )
    table.add_column("task")
    table.add_column("metric,filter")
    for kv in formats:
        table.add_column(kv, justify="right")
    for kv in formats:
        if kv != "bf16" and paired:
            table.add_column(f"Δ {kv}", justify="right")
    for task, metrics in summary["results"].items():
        for key, cells in metrics.items():
            row = [task, key]
            for kv in formats:
                cell = cells.get(kv)
                row.append("-" if cell is None else _value(cell))
            for kv in formats:
                if kv != "bf16" and paired:
                    row.append(_delta(paired.get(task, {}).get(key, {}).get(kv)))
            table.add_row(*row)
    return table


def _value(cell: dict[str, Any]) -> str:
    stderr = cell["stderr"]
    return f"{cell['value']:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _delta(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    if diff["ci95"] is None:
        return f"{diff['mean']:+.4f}"
    low, high = diff["ci95"]
    return f"{diff['mean']:+.4f} [{low:+.4f}, {high:+.4f}] MDD {diff['mdd80']:.4f}"
