"""``fp4kv eval longctx``: RULER-style retrieval at long lengths with the KV cache stored in each format.

For each length (tokens per sequence, prompt + generation, up to the model's maximum) the same
seeded samples (:mod:`fp4kv_cli.evaluate.longctx_tasks`) run through every KV format: the prompt
is written into the quantized cache by the chunked prefill (each chunk attends to the stored
prefix), then greedy decoding reads the cache as ``eval gsm8k`` does. Accuracy per length and
format, its paired difference against bf16 on the same samples, and the KV bytes one sequence
of that length holds in each format go to ``summary.json``, a rich table and ``summary.png``;
``samples-<kv>.jsonl`` has every output and its score (prompts are rebuilt from the seed).

Batches hold at most :data:`CHUNKS_PER_PROMPT` ``x prefill_chunk / length`` sequences, so a
prompt takes about that many prefill forwards: each chunk reads the whole stored prefix back,
and the re-read traffic grows as ``(batch x length)^2 / prefill_chunk``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fp4kv_cli import __version__
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.batching import auto_batch_size, kv_bytes_per_token
from fp4kv_cli.evaluate.generate import greedy_config, neutral_generation_defaults
from fp4kv_cli.evaluate.longctx_tasks import DEFAULT_LENGTHS, TASKS, TaskSample, make_samples, score
from fp4kv_cli.evaluate.metrics import accuracy, paired_difference
from fp4kv_cli.evaluate.prefill import DEFAULT_PREFILL_CHUNK
from fp4kv_cli.evaluate.results import (
    SampleLog,
    prepare_run_dir,
    resolve_local_paths,
    samples_path,
    write_summary,
)
from fp4kv_cli.evaluate.runner import (
    REFERENCE,
    ModelKV,
    cache_factory,
    check_generation_options,
    check_model_kv,
    run_batch,
    scale_source,
)
from fp4kv_cli.models import DTYPE_NAMES, load_model_and_tokenizer, parse_dtype, resolve_device
from fp4kv_cli.progress import count_progress

#: Prefill forwards a prompt takes at most, by the batch cap (see the module docstring).
CHUNKS_PER_PROMPT = 8


@dataclass(frozen=True)
class LongCtxSettings:
    """What ``fp4kv eval longctx`` was asked to do (see the CLI options)."""

    model: str
    kv_dtypes: tuple[str, ...] = ("bf16", "nvfp4")
    scales: str | None = None
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    tasks: tuple[str, ...] = TASKS
    limit: int = 8
    seed: int = 0
    max_new_tokens: int = 32
    batch_size: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    chat: bool | None = None
    device: str = "auto"
    dtype: str = "auto"
    out: str = "results"
    run_name: str | None = None
    decode_attention: str = "graph"


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"4k,8192"`` -> ``(4096, 8192)``: positive token counts (``k`` = 1024), ascending, unique."""
    lengths = []
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        try:
            value = int(part[:-1]) * 1024 if part.endswith("k") else int(part)
        except ValueError:
            raise FP4KVError(f"--lengths takes token counts like 4096 or 4k, got {part!r}") from None
        if value <= 0:
            raise FP4KVError(f"--lengths must be > 0 tokens, got {value}")
        lengths.append(value)
    if not lengths:
        raise FP4KVError("--lengths is empty; pass e.g. 4k,8k,16k,32k")
    return tuple(sorted(set(lengths)))


def run_longctx(settings: LongCtxSettings, console: Console) -> dict[str, Any]:
    """Run the evaluation and return the summary (also written to ``OUT/<run>/summary.json``)."""
    started = time.perf_counter()
    checked = _check(settings)
    lengths, model_kv = checked.lengths, checked.model_kv
    device = resolve_device(settings.device)
    dtype = parse_dtype(settings.dtype, device)
    with console.status(f"loading {settings.model} ({DTYPE_NAMES[dtype]}, {device})"):
        model, tokenizer = load_model_and_tokenizer(settings.model, device, dtype)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.chat and not has_template:
        raise FP4KVError(f"{settings.model} has no chat template; drop --chat")
    chat = has_template if settings.chat is None else settings.chat
    neutral_generation_defaults(model)

    def render(prompt: str, prefix: str) -> str:
        if not chat:
            return prompt + prefix
        messages = [{"role": "user", "content": prompt}]
        return (
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            + prefix.lstrip()
        )

    def encode(prompt: str, prefix: str) -> list[int]:
        return tokenizer(render(prompt, prefix), add_special_tokens=not chat)["input_ids"]

    samples = {
        length: make_samples(
            settings.tasks, length - settings.max_new_tokens, settings.limit, settings.seed,
            lambda prompt, prefix: len(encode(prompt, prefix)),
        )
        for length in lengths
    }  # fmt: skip
    ids = {length: [encode(s.prompt, s.answer_prefix) for s in rows] for length, rows in samples.items()}
    run_dir = prepare_run_dir(
        settings.out, settings.run_name or f"{_stem(settings.model)}-longctx", _config_record(settings), False
    )
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    gen_config = greedy_config(model, tokenizer, settings.max_new_tokens, stops)
    make_cache = cache_factory(
        model.config, settings.kv_dtypes, model_kv.scales_file, model_kv.k_offsets, dtype, device
    )
    text_config = model.config.get_text_config(decoder=True)
    shape = model_kv.shape
    per_token = {
        kv: kv_bytes_per_token(make_cache(kv, 1), shape.num_kv_heads, shape.head_dim)
        for kv in settings.kv_dtypes
    }
    records: dict[str, dict[int, list[dict[str, Any]]]] = {}
    total = sum(map(len, samples.values())) * len(settings.kv_dtypes)
    with count_progress(console, remaining=True) as progress:
        task = progress.add_task("longctx", total=total)
        for kv in settings.kv_dtypes:
            log = SampleLog(samples_path(run_dir, kv))
            records[kv] = {}
            for length in lengths:
                progress.update(task, description=f"longctx {kv} {length // 1024 if length >= 1024 else length}"
                                f"{'K' if length >= 1024 else ''}")  # fmt: skip
                longest = max(map(len, ids[length])) + settings.max_new_tokens
                batch = settings.batch_size or min(
                    auto_batch_size(text_config, make_cache(kv, longest), dtype, device, longest,
                                    len(ids[length]), settings.prefill_chunk).batch,
                    max(1, CHUNKS_PER_PROMPT * settings.prefill_chunk // longest),
                )  # fmt: skip
                rows = []
                for first in range(0, len(ids[length]), batch):
                    part = list(range(first, min(first + batch, len(ids[length]))))
                    fresh = _run(model, tokenizer, [ids[length][i] for i in part], make_cache(kv, longest),
                                 gen_config, stops, settings, [samples[length][i] for i in part], kv, batch)  # fmt: skip
                    log.append(fresh)
                    rows += fresh
                    progress.advance(task, len(part))
                records[kv][length] = rows
    summary = _summary(settings, run_dir, device, dtype, chat, checked, records, per_token)
    summary["wall_seconds"] = time.perf_counter() - started
    write_summary(run_dir, summary)
    plot_longctx(run_dir, summary)
    return summary


@dataclass(frozen=True)
class _Checked:
    """What :func:`_check` resolved before the model is loaded."""

    model_kv: ModelKV
    #: The lengths to run and those above the model's maximum (skipped).
    lengths: list[int]
    skipped: list[int]
    #: The config's ``max_position_embeddings`` (None: it has none, and no length is skipped).
    max_positions: int | None


def _check(settings: LongCtxSettings) -> _Checked:
    """Validate the settings before anything is written (one-line :class:`FP4KVError`)."""
    if settings.limit <= 0:
        raise FP4KVError(f"--limit must be > 0 samples per task and length, got {settings.limit}")
    check_generation_options(
        settings.batch_size, settings.max_new_tokens, settings.prefill_chunk, settings.decode_attention
    )
    model_kv = check_model_kv(settings.model, settings.kv_dtypes, settings.scales)
    text = model_kv.config.get("text_config") or model_kv.config
    max_positions = int(text["max_position_embeddings"]) if text.get("max_position_embeddings") else None
    maximum = max_positions or max(settings.lengths)
    lengths = [n for n in settings.lengths if n <= maximum]
    skipped = [n for n in settings.lengths if n > maximum]
    if not lengths:
        raise FP4KVError(
            f"every --lengths is above the model's maximum of {maximum} tokens; pass shorter ones"
        )
    if min(lengths) <= settings.max_new_tokens:
        raise FP4KVError(
            f"--lengths must exceed --max-new-tokens ({settings.max_new_tokens}); pass longer ones"
        )
    return _Checked(model_kv, lengths, skipped, max_positions)


def _stem(model: str) -> str:
    path = Path(model.rstrip("/"))
    return (path.stem if path.suffix == ".gguf" else path.name) or "model"


def _config_record(settings: LongCtxSettings) -> dict[str, Any]:
    record = asdict(settings)
    for key in ("kv_dtypes", "lengths", "tasks"):
        record[key] = list(record[key])
    return resolve_local_paths(record, ("model", "scales"))


def _run(
    model: Any,
    tokenizer: Any,
    ids: list[list[int]],
    cache: Any,
    gen_config: Any,
    stops: Sequence[str],
    settings: LongCtxSettings,
    samples: Sequence[TaskSample],
    kv: str,
    batch: int,
) -> list[dict[str, Any]]:
    """Generate one batch and score it; one record per sample."""
    outputs, stats = run_batch(model, tokenizer, ids, cache, gen_config, stops, settings.decode_attention,
                               settings.prefill_chunk)  # fmt: skip
    records = []
    for sample, prompt_ids, out in zip(samples, ids, outputs):
        value = score(out.text, sample.references)
        records.append({
            **sample.to_dict(), "length": sample.length + settings.max_new_tokens, "kv": kv,
            "prompt_tokens": len(prompt_ids), "output": out.text, "score": value, "correct": value == 1.0,
            "new_tokens": out.new_tokens, "seconds": stats["seconds"] / len(ids), "batch_size": batch,
            "prefill_row_chunk": stats["prefill_row_chunk"], "decode_attention": stats["decode_attention"],
            "kv_bytes_per_token": stats["kv_bytes_per_token"], "peak_gpu_bytes": stats["peak_gpu_bytes"],
        })  # fmt: skip
    return records


def _summary(
    settings: LongCtxSettings,
    run_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    chat: bool,
    checked: _Checked,
    records: Mapping[str, Mapping[int, list[dict[str, Any]]]],
    per_token: Mapping[str, int],
) -> dict[str, Any]:
    import transformers

    lengths, model_kv = checked.lengths, checked.model_kv
    reference = records.get(REFERENCE)
    results: dict[str, Any] = {}
    for kv, by_length in records.items():
        per_length = {}
        for length in lengths:
            rows = by_length[length]
            flags = [r["correct"] for r in rows]
            paired = None
            if reference is not None and kv != REFERENCE:
                paired = paired_difference(flags, [r["correct"] for r in reference[length]]).to_dict()
            peaks = [r["peak_gpu_bytes"] for r in rows if r["peak_gpu_bytes"] is not None]
            per_length[str(length)] = {
                "accuracy": accuracy(flags).to_dict(),
                "mean_score": sum(r["score"] for r in rows) / len(rows),
                "vs_bf16": paired,
                "tasks": {
                    task: accuracy([r["correct"] for r in rows if r["task"] == task]).to_dict()
                    for task in settings.tasks
                },
                "mean_prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows),
                "kv_bytes_per_sequence": per_token[kv] * length,
                "generation_seconds": sum(r["seconds"] for r in rows),
                "batch_size": rows[0]["batch_size"],
                "prefill_row_chunk": rows[0]["prefill_row_chunk"],
                "peak_gpu_bytes": max(peaks) if peaks else None,
                "decode_attention": sorted({r["decode_attention"] for r in rows}),
            }
        every = [r for length in lengths for r in by_length[length]]
        pooled = None
        if reference is not None and kv != REFERENCE:
            ref_flags = [r["correct"] for length in lengths for r in reference[length]]
            pooled = paired_difference([r["correct"] for r in every], ref_flags).to_dict()
        results[kv] = {
            "scale_source": scale_source(kv, model_kv.scales_file),
            "k_centering": model_kv.k_offsets is not None and kv != REFERENCE,
            "kv_bytes_per_token": per_token[kv],
            "accuracy": accuracy([r["correct"] for r in every]).to_dict(),
            "vs_bf16": pooled,
            "lengths": per_length,
        }
    return {
        "task": "longctx",
        "model": settings.model,
        "run_dir": str(run_dir),
        "tasks": list(settings.tasks),
        "lengths": list(lengths),
        "skipped_lengths": list(checked.skipped),
        "max_position_embeddings": checked.max_positions,
        "samples_per_task_and_length": settings.limit,
        "seed": settings.seed,
        "chat_template": chat,
        "max_new_tokens": settings.max_new_tokens,
        "prefill_chunk": settings.prefill_chunk,
        "device": str(device),
        "dtype": DTYPE_NAMES[dtype],
        "scales": settings.scales,
        "kv_shape": asdict(model_kv.shape),
        "versions": {
            "fp4kv": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "results": results,
    }


def plot_longctx(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    """``summary.png``: accuracy (95% CI) against length, one line per KV format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fp4kv_cli.atomic import atomic_path

    lengths = summary["lengths"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for kv, result in summary["results"].items():
        accs = [result["lengths"][str(n)]["accuracy"] for n in lengths]
        means = [a["mean"] for a in accs]
        errors = [
            [m - a["ci95"][0] for m, a in zip(means, accs)],
            [a["ci95"][1] - m for m, a in zip(means, accs)],
        ]
        ax.errorbar(lengths, means, yerr=errors, marker="o", capsize=3, label=kv)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("retrieval accuracy (95% CI)")
    ax.set_title(f"{Path(summary['model']).name}: {', '.join(summary['tasks'])}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "summary.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
