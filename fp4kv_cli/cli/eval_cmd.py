"""``fp4kv eval gsm8k``: GSM8K accuracy and fidelity with the KV cache stored in each chosen format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fp4kv_cli.cli.app import (
    DeviceMapOption,
    DeviceOption,
    DtypeOption,
    MaxMemoryOption,
    console,
    err_console,
    eval_app,
    guarded,
)

#: Width of the results table when output is not a terminal (logs, CI), so it is not wrapped.
TABLE_WIDTH = 170


@eval_app.command("gsm8k")
@guarded(oom_fix="lower --batch-size (or --max-new-tokens, --fidelity-samples)")
def gsm8k(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder, .gguf file or hub id.")],
    kv_dtype: Annotated[
        str,
        typer.Option(
            "--kv-dtype",
            help="Comma-separated KV formats: bf16, fp8, nvfp4, blockfp4, and recipe "
            "(the per-layer K/V formats of a --scales file written by fp4kv analyze --write-recipe).",
        ),
    ] = "bf16,nvfp4",
    scales: Annotated[
        str | None,
        typer.Option(
            "--scales", help="scales.json from fp4kv calibrate (else fp8/nvfp4 scales are dynamic)."
        ),
    ] = None,
    num_fewshot: Annotated[
        int, typer.Option("--num-fewshot", help="Few-shot examples from the train split.")
    ] = 5,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Evaluate only the first N test questions.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Questions generated together.")] = 16,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Generation budget per question.")
    ] = 256,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Zero-shot CoT through the model's chat template instead of few-shot."),
    ] = False,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Local GSM8K test jsonl (question/answer) instead of the shipped one."),
    ] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    fidelity: Annotated[
        bool, typer.Option("--fidelity/--no-fidelity", help="Teacher-forced KL / top-1 / K,V error vs bf16.")
    ] = True,
    fidelity_samples: Annotated[
        int, typer.Option("--fidelity-samples", help="Questions (prompt + gold answer) used for fidelity.")
    ] = 8,
    out: Annotated[str, typer.Option("--out", help="Folder that receives the run folder.")] = "results",
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="Run folder name (default <model>-gsm8k).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed run, skipping finished questions.")
    ] = False,
    decode_attention: Annotated[
        str,
        typer.Option(
            "--decode-attention",
            help="graph: decode steps attend straight from the FP4/FP8/bf16 buffers with the Triton kernel, "
            "static shapes, each step one CUDA graph replay (GPU, full-attention SDPA models; else fused); "
            "fused: the same kernel, eager steps through generate (GPU; else gather); gather: dequantize the "
            "prefix, then SDPA (the CPU path).",
        ),
    ] = "graph",
    samples: Annotated[
        int,
        typer.Option(
            "--samples",
            help="Sampled generations per question (needs --temperature > 0); accuracy is their mean, "
            "differences vs bf16 are paired per question. A --resume may raise it.",
        ),
    ] = 1,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Sampling temperature; 0 (default) is greedy, as lm-eval.")
    ] = 0.0,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature).")
    ] = 1.0,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Sampling seed; every format draws the same noise per question and sample."
        ),
    ] = 0,
) -> None:
    """GSM8K (lm-eval gsm8k prompt and scoring) with the KV cache really stored in each format."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.evaluate.runner import EvalSettings, parse_kv_dtypes, run_gsm8k

    settings = EvalSettings(
        model=model,
        kv_dtypes=parse_kv_dtypes(kv_dtype),
        scales=scales,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        chat=chat,
        data=data,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        fidelity=fidelity,
        fidelity_samples=fidelity_samples,
        out=out,
        run_name=run_name,
        resume=resume,
        decode_attention=decode_attention.strip().lower(),
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    summary = run_gsm8k(settings, err_console)
    table = summary_table(summary)
    (console if console.is_terminal else Console(width=TABLE_WIDTH)).print(table)
    run_dir = summary["run_dir"]
    png = ", summary.png" if (Path(run_dir) / "summary.png").is_file() else ""
    console.print(f"results in {run_dir}/ (summary.json, samples-<kv>.jsonl{png})", highlight=False)


def summary_table(summary: dict[str, Any]) -> Table:
    """Side-by-side rich table of every KV format in a summary."""
    decoding = summary.get("decoding", {"mode": "greedy"})
    sampled = decoding["mode"] == "sampled"
    protocol = (
        f"{decoding['samples']} samples/question at T={decoding['temperature']:g}, top-p={decoding['top_p']:g}, "
        f"seed {decoding['seed']}"
        if sampled
        else "greedy"
    )
    table = Table(
        title=f"GSM8K {summary['prompt']}, {summary['num_questions']} questions, {protocol}, {summary['model']}",
        caption=(
            "accuracy: mean over samples [95% CI over questions]" if sampled else "accuracy [95% Wilson CI]"
        )
        + "; delta vs bf16 on the same questions [95% CI]; MDD: smallest strict delta detected with 80% power"
        "; KL in nats per token",
    )
    for column in ("kv", "scales", "strict", "flexible", "Δ strict", "Δ flexible", "MDD", "KL", "top-1",
                   "tok/s", "KV B/token", "gen s"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("kv", "scales") else "right")
    for kv, r in summary["results"].items():
        fid = r["fidelity"]
        table.add_row(
            kv,
            r["scale_source"] + (" +center" if r["k_centering"] else ""),
            _acc(r["accuracy"]["strict"]),
            _acc(r["accuracy"]["flexible"]),
            _delta(r["vs_bf16"], "strict"),
            _delta(r["vs_bf16"], "flexible"),
            _mdd(r["vs_bf16"]),
            "-" if fid is None else f"{fid['kl']:.4f}",
            "-" if fid is None else f"{fid['top1']:.1%}",
            "-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:.0f}",
            f"{r['kv_bytes_per_token']:,} ({r['kv_bytes_per_token_vs_bf16']:.3f}x)",
            f"{r['generation_seconds']:.1f}",
        )
    return table


def _acc(acc: dict[str, Any]) -> str:
    if acc["ci95"] is None:
        return f"{acc['mean']:.1%}"
    low, high = acc["ci95"]
    return f"{acc['mean']:.1%} [{low:.1%}, {high:.1%}]"


def _mdd(paired: dict[str, Any] | None) -> str:
    mdd = None if paired is None else paired["strict"].get("mdd80")
    return "-" if mdd is None else f"{mdd:.1%}"


def _delta(paired: dict[str, Any] | None, key: str) -> str:
    if paired is None:
        return "-"
    d = paired[key]
    if d["ci95"] is None:
        return f"{d['mean']:+.1%}"
    return f"{d['mean']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]"
