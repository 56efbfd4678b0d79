"""``fp4kv eval longctx``: RULER-style long-context retrieval with the KV cache stored in each format."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fp4kv_cli.cli.app import DeviceOption, DtypeOption, console, err_console, eval_app, guarded
from fp4kv_cli.cli.eval_cmd import TABLE_WIDTH
from fp4kv_cli.evaluate.longctx_tasks import DEFAULT_LENGTHS, TASKS, parse_tasks

#: Short column names of the tasks in the table.
TASK_COLUMNS = {
    "niah_single": "niah-1",
    "niah_multikey": "niah-mk",
    "passkey": "passkey",
    "variable_tracking": "vt",
}


@eval_app.command("longctx")
@guarded
def longctx(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder, .gguf file or hub id.")],
    kv_dtype: Annotated[
        str,
        typer.Option("--kv-dtype", help="Comma-separated KV formats: bf16, fp8, nvfp4, blockfp4, recipe."),
    ] = "bf16,nvfp4",
    scales: Annotated[
        str | None,
        typer.Option("--scales", help="scales.json from fp4kv calibrate (else scales are dynamic)."),
    ] = None,
    lengths: Annotated[
        str,
        typer.Option(
            "--lengths",
            help="Tokens per sequence (prompt + generation); those above the model's maximum are skipped.",
        ),
    ] = ",".join(str(n) for n in DEFAULT_LENGTHS),
    tasks: Annotated[str, typer.Option("--tasks", help=f"Comma-separated: {', '.join(TASKS)}.")] = ",".join(
        TASKS
    ),
    limit: Annotated[int, typer.Option("--limit", help="Samples per task and length.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the haystacks, needles and depths.")] = 0,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Generation budget per sample.")
    ] = 32,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="Sequences generated together (default: what free memory holds, capped so a prompt "
            "takes at most 8 prefill chunks).",
        ),
    ] = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            "--prefill-chunk", help="Prompt tokens per prefill forward over the whole batch (default 16384)."
        ),
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="Wrap prompts in the chat template (default: if the tokenizer has one)."
        ),
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    out: Annotated[str, typer.Option("--out", help="Folder that receives the run folder.")] = "results",
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="Run folder name (default <model>-longctx).")
    ] = None,
    decode_attention: Annotated[
        str, typer.Option("--decode-attention", help="graph, fused or gather (as in fp4kv eval gsm8k).")
    ] = "graph",
) -> None:
    """Needle / multi-key / passkey / variable-tracking retrieval at 4K-32K tokens, per KV format."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.evaluate.longctx import LongCtxSettings, parse_lengths, run_longctx
    from fp4kv_cli.evaluate.prefill import DEFAULT_PREFILL_CHUNK
    from fp4kv_cli.evaluate.runner import parse_kv_dtypes

    settings = LongCtxSettings(
        model=model,
        kv_dtypes=parse_kv_dtypes(kv_dtype),
        scales=scales,
        lengths=parse_lengths(lengths),
        tasks=parse_tasks(tasks),
        limit=limit,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        prefill_chunk=DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk,
        chat=chat,
        device=device,
        dtype=dtype,
        out=out,
        run_name=run_name,
        decode_attention=decode_attention.strip().lower(),
    )
    summary = run_longctx(settings, err_console)
    (console if console.is_terminal else Console(width=TABLE_WIDTH)).print(longctx_table(summary))
    if summary["skipped_lengths"]:
        console.print(
            f"skipped lengths above the model's maximum: {summary['skipped_lengths']}", highlight=False
        )
    console.print(f"results in {summary['run_dir']}/ (summary.json, samples-<kv>.jsonl, summary.png)",
                  highlight=False)  # fmt: skip


def longctx_table(summary: dict[str, Any]) -> Table:
    """One row per KV format and length: accuracy, paired difference vs bf16, per task, KV size."""
    table = Table(
        title=f"Long-context retrieval, {summary['samples_per_task_and_length']} samples per task and length, "
        f"{summary['model']}",
        caption="accuracy [95% Wilson CI]; Δ vs bf16 on the same samples [95% CI]; KV MiB one sequence holds",
    )
    columns = ["kv", "length", "n", "accuracy", "Δ vs bf16", *(TASK_COLUMNS[t] for t in summary["tasks"]),
               "KV MiB/seq", "gen s"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "kv" else "right")
    for kv, result in summary["results"].items():
        for length in summary["lengths"]:
            r = result["lengths"][str(length)]
            acc = r["accuracy"]
            table.add_row(
                kv,
                f"{length:,}",
                str(acc["n"]),
                f"{acc['mean']:.1%} [{acc['ci95'][0]:.0%}, {acc['ci95'][1]:.0%}]",
                _delta(r["vs_bf16"]),
                *(f"{r['tasks'][t]['mean']:.0%}" for t in summary["tasks"]),
                f"{r['kv_bytes_per_sequence'] / 2**20:,.1f}",
                f"{r['generation_seconds']:.1f}",
            )
    return table


def _delta(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return "-"
    if paired["ci95"] is None:
        return f"{paired['mean']:+.1%}"
    return f"{paired['mean']:+.1%} [{paired['ci95'][0]:+.1%}, {paired['ci95'][1]:+.1%}]"
