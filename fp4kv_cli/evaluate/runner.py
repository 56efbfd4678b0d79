"""``fp4kv eval gsm8k`` end to end: check inputs, load the model once, measure fidelity, generate
and score every question for each KV format (resumable), then write the summary and plot.

Greedy by default (lm-eval's protocol). With ``temperature > 0`` every question gets ``samples``
seeded sampled generations (:mod:`fp4kv_cli.evaluate.sampling`, the same noise for every
format), scored as the mean over samples with per-question paired differences vs bf16; a
resumed run may ask for more samples than it has.

The KV dtype ``recipe`` runs the per-layer K/V formats written in the ``--scales`` file
(``k_format`` / ``v_format``, from ``fp4kv analyze --write-recipe``).

Under ``torchrun`` / ``accelerate launch`` every process runs :func:`run_gsm8k` on its own device
and the batches are shared out (:mod:`fp4kv_cli.evaluate.data_parallel`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fp4kv_cli import __version__
from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.data import load_gsm8k
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate import gsm8k
from fp4kv_cli.evaluate.batching import BatchPlan, auto_batch_size
from fp4kv_cli.evaluate.data_parallel import (
    Ranks,
    fold_shards,
    open_shards,
    remove_shard_folder,
    shard_path,
    write_in_order,
)
from fp4kv_cli.evaluate.fidelity import Fidelity, measure_fidelity
from fp4kv_cli.evaluate.generate import (
    Continuation,
    generate_batch,
    greedy_config,
    neutral_generation_defaults,
)
from fp4kv_cli.evaluate.metrics import (
    accuracy,
    paired_difference,
    sample_plan,
    sampled_accuracy,
    sampled_paired_difference,
)
from fp4kv_cli.evaluate.prefill import DEFAULT_PREFILL_CHUNK, check_prefill_chunk, row_chunk
from fp4kv_cli.evaluate.refill import generate_refilled, refill_refusal
from fp4kv_cli.evaluate.results import (
    RESUME_KEY_DEFAULTS,
    SampleLog,
    check_run_dir,
    load_fidelity,
    prepare_run_dir,
    resolve_local_paths,
    samples_path,
    save_fidelity,
    try_plot_summary,
    write_summary,
)
from fp4kv_cli.evaluate.sampling import RowSampler, SamplingSpec, row_keys
from fp4kv_cli.evaluate.static_decode import decode_path
from fp4kv_cli.fused_attention import decode_kernels, decode_read
from fp4kv_cli.model_config import KVShape, load_config_dict
from fp4kv_cli.models import (
    DTYPE_NAMES,
    input_device,
    load_model_and_tokenizer,
    parse_dtype,
    placed_devices,
)
from fp4kv_cli.progress import count_progress, status
from fp4kv_cli.quant.backend import get_backend
from fp4kv_cli.quant.methods import BF16KVMethod, KVCacheMethod
from fp4kv_cli.quant.registry import KV_CACHE_METHOD_REGISTRY, get_kv_cache_method
from fp4kv_cli.quant.scales import ScalesFile, load_scales_file
from fp4kv_cli.quant.storage import REFERENCE, KVStorage, kv_method
from fp4kv_cli.validate import check_causal_lm

#: KV dtype name for the per-layer formats of the scales file.
RECIPE = "recipe"
#: How decode steps read the cache: the fused kernel (where it runs), the same in static-shape
#: steps replayed as CUDA graphs, or dequantized copies + SDPA.
DECODE_ATTENTION = ("graph", "fused", "gather")
#: The decode read of sample records and runs from before ``--decode-attention`` existed.
OLD_DECODE_ATTENTION = RESUME_KEY_DEFAULTS["decode_attention"]


@dataclass(frozen=True)
class EvalSettings:
    """What ``fp4kv eval gsm8k`` was asked to do (see the CLI options for each field)."""

    model: str
    kv_dtypes: tuple[str, ...] = ("bf16", "nvfp4")
    scales: str | None = None
    num_fewshot: int = 5
    limit: int | None = None
    #: None: automatic (:mod:`fp4kv_cli.evaluate.batching`), per format.
    batch_size: int | None = None
    max_new_tokens: int = 256
    chat: bool = False
    data: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    fidelity: bool = True
    fidelity_samples: int = 8
    out: str = "results"
    run_name: str | None = None
    resume: bool = False
    decode_attention: str = "graph"
    #: Refill finished rows' slots with waiting questions in the ``graph`` decode
    #: (:mod:`fp4kv_cli.evaluate.refill`) where it applies; False: one batch at a time.
    refill: bool = True
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def sampling(self) -> SamplingSpec | None:
        """The sampling protocol, or None for greedy decoding (``temperature`` 0)."""
        if self.temperature == 0:
            return None
        return SamplingSpec(self.temperature, self.top_p, self.seed)


def parse_kv_dtypes(text: str) -> tuple[str, ...]:
    """``"bf16,nvfp4"`` -> ``("bf16", "nvfp4")``: known formats, lower-cased, duplicates dropped."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise FP4KVError("--kv-dtype is empty; pass e.g. bf16,fp8,nvfp4,nvfp4_4over6,blockfp4")
    known = [*KV_CACHE_METHOD_REGISTRY, RECIPE]
    for name in names:
        if name not in known:
            raise FP4KVError(f"unknown KV cache dtype {name!r}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def default_run_name(model: str) -> str:
    """``<model name>-gsm8k``: folder or file stem of a local model, last part of a hub id."""
    path = Path(model.rstrip("/"))
    stem = path.stem if path.suffix == ".gguf" else path.name
    return f"{stem or 'model'}-gsm8k"


@dataclass
class _Plan:
    """Everything resolved before the model is loaded."""

    questions: list[dict[str, str]]
    train: list[dict[str, str]]
    shape: KVShape
    scales_file: ScalesFile | None
    k_offsets: torch.Tensor | None
    run_dir: Path


def run_gsm8k(settings: EvalSettings, console: Console) -> dict[str, Any] | None:
    """Run the evaluation and return the summary (also written to ``OUT/<run>/summary.json``).
    Under a data-parallel launch rank 0 returns it and prints progress; the other ranks return None."""
    ranks = Ranks.from_env()
    if ranks.parallel and settings.device_map is not None:
        raise FP4KVError(
            "--device-map splits one model over devices, a data-parallel launch runs one whole model per "
            "process; drop --device-map or launch a single process"
        )
    with ranks.group():
        return _run_gsm8k(settings, console if ranks.writer else Console(quiet=True), ranks)


def _run_gsm8k(settings: EvalSettings, console: Console, ranks: Ranks) -> dict[str, Any] | None:
    started = time.perf_counter()
    device = ranks.device(settings.device)
    settings = replace(settings, decode_attention=effective_decode(settings.decode_attention, device))
    plan = _plan(settings)
    clock = RunClock(plan.run_dir, started)
    dtype = parse_dtype(settings.dtype, device)
    where = settings.device_map or device
    with status(console, f"loading {settings.model} ({DTYPE_NAMES[dtype]}, {where})"):
        model, tokenizer = load_model_and_tokenizer(
            settings.model, device, dtype, settings.device_map, settings.max_memory
        )
    device = input_device(model)
    console.print(f"placed on {', '.join(placed_devices(model))}", highlight=False)
    if settings.chat and not getattr(tokenizer, "chat_template", None):
        raise FP4KVError(f"{settings.model} has no chat template; drop --chat to use the few-shot prompt")
    # Only now, with every input checked and the model loaded, does the run folder appear; its
    # shared files have one writer, rank 0, once every rank has checked the folder.
    ranks.barrier()
    if ranks.writer:
        plan.run_dir = prepare_run_dir(
            settings.out, plan.run_dir.name, config_record(settings), settings.resume
        )
        open_shards(plan.run_dir, settings.kv_dtypes, _record_key, ranks.parallel)
    ranks.barrier()
    neutral_generation_defaults(model)
    prompts = gsm8k_prompts(settings, plan.questions, plan.train, tokenizer)
    prompt_ids = encode_prompts(tokenizer, prompts, settings.chat)
    make_cache = cache_factory(
        model.config, settings.kv_dtypes, plan.scales_file, plan.k_offsets, dtype, device
    )
    if settings.decode_attention != "gather":
        for kv in settings.kv_dtypes:
            path, reason = decode_path(model, make_cache(kv, 1))
            if path != settings.decode_attention:
                console.print(f"{kv}: decode read {path}, not {settings.decode_attention}: {reason}", highlight=False)
    fidelity: dict[str, Fidelity] = {}
    if settings.fidelity and ranks.writer:
        count = min(settings.fidelity_samples, len(plan.questions))
        fidelity = load_fidelity(plan.run_dir, count, settings.kv_dtypes) or {}
        if not fidelity:
            answers = [_answer_ids(tokenizer, q["answer"], settings.chat) for q in plan.questions[:count]]
            with count_progress(console, remaining=True) as progress:
                task = progress.add_task("fidelity (teacher-forced)", total=count)
                fidelity = measure_fidelity(
                    model,
                    list(zip(prompt_ids[:count], answers)),
                    make_cache,
                    settings.kv_dtypes,
                    REFERENCE,
                    lambda: progress.advance(task),
                )
            save_fidelity(plan.run_dir, count, fidelity)
            clock.save()
    stops = stop_strings(tokenizer)
    config = greedy_config(model, tokenizer, settings.max_new_tokens, stops)
    spec = settings.sampling
    records: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    batches: dict[str, BatchPlan | int] = {}
    longest = max(map(len, prompt_ids)) + settings.max_new_tokens
    text_config = model.config.get_text_config(decoder=True)
    for kv in settings.kv_dtypes:
        automatic = settings.batch_size or auto_batch_size(
            text_config,
            make_cache(kv, longest),
            dtype,
            device,
            longest,
            len(prompt_ids) * settings.samples,
            settings.prefill_chunk,
        )
        # an automatic batch: every rank takes the smallest of the ranks' plans (a given one is shared)
        batches[kv] = automatic if settings.batch_size else min(ranks.gather(automatic), key=_batch)
        if isinstance(batches[kv], BatchPlan) and batches[kv].free_bytes is not None:
            auto = batches[kv]
            console.print(f"{kv}: batch {auto.batch} ({auto.free_bytes / 2**30:.1f} GiB free, "
                          f"{auto.row_bytes / 2**20:.1f} MiB per row)", highlight=False)  # fmt: skip
        run_pool = None
        if settings.refill and settings.decode_attention == "graph":
            refusal = refill_refusal(model, make_cache(kv, 1))
            if refusal is None:
                run_pool = _refill_runner(model, tokenizer, prompt_ids, lambda hint, kv=kv: make_cache(kv, hint),
                                          config, stops, _batch(batches[kv]), settings, device)  # fmt: skip
            else:
                console.print(f"{kv}: one batch at a time, not refilled rows: {refusal}", highlight=False)
        records[kv] = _generate_all(
            console,
            kv,
            plan,
            prompt_ids,
            settings,
            _batch(batches[kv]),
            lambda ids, hint, rows, kv=kv: run_batch(
                model,
                tokenizer,
                ids,
                make_cache(kv, hint),
                config,
                stops,
                settings.decode_attention,
                settings.prefill_chunk,
                None if spec is None else _sampler(spec, rows, device),
            ),
            ranks,
            clock.save if ranks.writer else lambda: None,
            run_pool,
        )
    ranks.barrier()  # every rank's shard is complete
    if not ranks.writer:
        return None
    order = _row_order(prompt_ids, settings.samples)
    for kv in settings.kv_dtypes:
        records[kv] = fold_shards(plan.run_dir, kv, _record_key)
        write_in_order(plan.run_dir, kv, records[kv], order)
    remove_shard_folder(plan.run_dir)
    summary = _summary(settings, plan, device, dtype, records, fidelity, prompts[0], batches)
    summary["processes"] = ranks.world
    summary.update(clock.save())
    write_summary(plan.run_dir, summary)
    png, problem = try_plot_summary(plan.run_dir, summary)
    if png is None:
        console.print(f"[yellow]warning:[/] summary.png not drawn ({problem}); the results are in summary.json")
    return summary


def effective_decode(requested: str, device: torch.device) -> str:
    """The decode read ``requested`` resolves to on ``device``: ``graph`` and ``fused`` need the
    Triton kernel on CUDA (or interpreted); elsewhere every step is a ``gather`` read. (``graph``
    still falls back to ``fused`` for models it cannot capture: the sample records say which ran.)"""
    if requested not in DECODE_ATTENTION or requested == "gather":
        return requested
    kernels = decode_kernels()
    if kernels is None or (device.type != "cuda" and not kernels.INTERPRETED):
        return "gather"
    return requested


class RunClock:
    """Wall seconds of a run folder over all its sessions (a resumed run adds to the earlier ones).

    ``wall.json`` holds the seconds of earlier sessions; :meth:`save` rewrites it with this
    session's seconds so far (after each saved batch), so a killed session still counts up to
    its last saved work.
    """

    FILE = "wall.json"

    def __init__(self, run_dir: Path, started: float) -> None:
        self.path = run_dir / self.FILE
        self.started = started
        try:
            earlier = json.loads(self.path.read_text())
            self.earlier = float(earlier["earlier_seconds"]) + float(earlier["session_seconds"])
            self.sessions = int(earlier["sessions"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            self.earlier, self.sessions = 0.0, 1

    def save(self) -> dict[str, Any]:
        """Write ``wall.json``; returns the summary's fields ``wall_seconds`` (all sessions),
        ``wall_seconds_session`` and ``sessions``."""
        session = time.perf_counter() - self.started
        write_json_atomic(
            self.path, {"earlier_seconds": self.earlier, "session_seconds": session, "sessions": self.sessions}
        )
        return {"wall_seconds": self.earlier + session, "wall_seconds_session": session, "sessions": self.sessions}


def _plan(settings: EvalSettings) -> _Plan:
    check_eval_options(settings)
    _check_sampling(settings)
    model_kv = check_model_kv(settings.model, settings.kv_dtypes, settings.scales)
    questions = load_gsm8k("test", settings.data)[: settings.limit]
    train = load_gsm8k("train")
    if not settings.chat and settings.num_fewshot > len(train):
        raise FP4KVError(
            f"--num-fewshot {settings.num_fewshot} is more than the {len(train)} GSM8K train examples; "
            "pass at most that (lm-eval uses 5)"
        )
    run_dir = check_run_dir(
        settings.out,
        settings.run_name or default_run_name(settings.model),
        config_record(settings),
        settings.resume,
    )
    return _Plan(questions, train, model_kv.shape, model_kv.scales_file, model_kv.k_offsets, run_dir)


@dataclass(frozen=True)
class ModelKV:
    """A model's config dict and KV shape, with the scales file and K centering offsets its KV
    formats run with (None: no ``--scales``)."""

    config: dict[str, Any]
    shape: KVShape
    scales_file: ScalesFile | None
    k_offsets: torch.Tensor | None


def check_model_kv(model: str, kv_dtypes: Sequence[str], scales: str | None) -> ModelKV:
    """Check, before the model is loaded, that ``model`` (its config only) is a causal LM whose KV
    cache every one of ``kv_dtypes`` can store (``recipe``: the per-layer formats of the
    ``scales`` file), with that scales file matching the model; :class:`FP4KVError` otherwise."""
    kv_dtypes = parse_kv_dtypes(",".join(kv_dtypes))
    config = load_config_dict(model)
    check_causal_lm(config, model)
    shape = KVShape.from_config(config)
    scales_file = k_offsets = None
    if scales is not None:
        scales_file, k_offsets = load_scales_for(config, scales)
    formats = [kv for kv in kv_dtypes if kv != RECIPE]
    if RECIPE in kv_dtypes:
        k_formats, v_formats = _recipe_formats(scales_file)
        formats += k_formats + v_formats
    for kv in dict.fromkeys(formats):
        get_kv_cache_method(kv).check_head_dim(shape.head_dim)
    return ModelKV(config, shape, scales_file, k_offsets)


def check_eval_options(settings: EvalSettings) -> None:
    """The option checks every engine's GSM8K eval shares (one-line errors before anything is loaded)."""
    if settings.limit is not None and settings.limit <= 0:
        raise FP4KVError(f"--limit must be > 0, got {settings.limit}; omit it to use every question")
    if settings.fidelity_samples <= 0:
        raise FP4KVError(f"--fidelity-samples must be > 0, got {settings.fidelity_samples}")
    check_generation_options(
        settings.batch_size, settings.max_new_tokens, settings.prefill_chunk, settings.decode_attention
    )
    if settings.num_fewshot < 0:
        raise FP4KVError(f"--num-fewshot must be >= 0, got {settings.num_fewshot}")


def check_generation_options(
    batch_size: int | None, max_new_tokens: int, prefill_chunk: int, decode_attention: str
) -> None:
    """The generation options every eval of fp4kv's cache shares (``--batch-size``, None for
    automatic; ``--max-new-tokens``; ``--prefill-chunk``; ``--decode-attention``): one-line
    :class:`FP4KVError` before anything is loaded."""
    for option, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value <= 0:
            raise FP4KVError(f"{option} must be > 0, got {value}")
    check_prefill_chunk(prefill_chunk)
    if decode_attention not in DECODE_ATTENTION:
        raise FP4KVError(
            f"--decode-attention must be one of {', '.join(DECODE_ATTENTION)}, got {decode_attention!r}"
        )


def _check_sampling(settings: EvalSettings) -> None:
    """``--samples`` / ``--temperature`` / ``--top-p`` / ``--seed`` make sense together."""
    if settings.samples <= 0:
        raise FP4KVError(f"--samples must be > 0, got {settings.samples}")
    if settings.temperature < 0:
        raise FP4KVError(f"--temperature must be >= 0, got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise FP4KVError(f"--top-p must be in (0, 1], got {settings.top_p}")
    if settings.seed < 0:
        raise FP4KVError(f"--seed must be >= 0, got {settings.seed}")
    if settings.temperature == 0 and (settings.samples > 1 or settings.top_p < 1):
        raise FP4KVError(
            "--samples > 1 and --top-p < 1 need --temperature > 0 (temperature 0 is greedy, one answer per "
            "question); pass e.g. --temperature 0.6"
        )


def _sampler(spec: SamplingSpec, rows: Sequence[tuple[int, int]], device: torch.device) -> RowSampler:
    """The sampler of a batch generating ``rows`` ``(question, sample)``."""
    questions, samples = zip(*rows)
    return RowSampler(spec, row_keys(spec.seed, questions, samples, device))


def config_record(settings: EvalSettings) -> dict[str, Any]:
    """The run's settings as its run folder records them (``--resume`` checks them against it):
    lists for tuples, ``num_fewshot`` 0 with ``--chat``, local paths resolved."""
    record = asdict(settings)
    record["kv_dtypes"] = list(settings.kv_dtypes)
    record["num_fewshot"] = 0 if settings.chat else settings.num_fewshot
    return resolve_local_paths(record, ("model", "data", "scales"))


def load_scales_for(config: Mapping[str, Any], scales_path: str) -> tuple[ScalesFile, torch.Tensor | None]:
    """The scales file at ``scales_path``, checked against the model's ``config`` dict, and its K
    centering offsets ``[layers, kv_heads, head_dim]`` if it has any, as ``fp4kv eval gsm8k``
    loads them."""
    scales_file = load_scales_file(scales_path)
    scales_file.check_model(config)
    return scales_file, _k_offsets(scales_file, KVShape.from_config(config))


def _k_offsets(scales_file: ScalesFile, shape: KVShape) -> torch.Tensor | None:
    """Per-layer K centering offsets ``[layers, kv_heads, head_dim]`` from the scales file, if any."""
    tensor = KVCacheMethod.load_k_offsets(scales_file)
    if tensor is None:
        return None
    expected = (shape.num_layers, shape.num_kv_heads, shape.head_dim)
    if tuple(tensor.shape) != expected:
        raise FP4KVError(
            f"scales file k_offset has shape {tuple(tensor.shape)}, the model needs {expected}; "
            "calibrate this model with fp4kv calibrate"
        )
    return tensor


def cache_factory(
    config: Any,
    kv_dtypes: Sequence[str],
    scales_file: ScalesFile | None,
    k_offsets: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Callable[[str, int], QuantKVCache]:
    """``make_cache(kv, capacity_hint)``: a fresh cache of KV dtype ``kv`` (one of ``kv_dtypes``,
    or the ``bf16`` reference) for a transformers model ``config``, as ``fp4kv eval gsm8k`` runs it.

    Each KV dtype's :class:`KVStorage` is built once here by :meth:`KVStorage.from_scales`
    (scales calibrated from ``scales_file`` where given, dynamic otherwise; ``recipe`` runs the
    file's per-layer formats; every format but the reference stores K minus ``k_offsets`` (from
    :func:`load_scales_for`), rotated when the file records a ``k_rotation``), on ``device``.
    """
    num_layers = config.get_text_config(decoder=True).num_hidden_layers
    storages = {
        kv: KVStorage.from_scales(kv, num_layers, scales_file, k_offsets, lambda name: kv_method(name, dtype))
        for kv in dict.fromkeys([REFERENCE, *kv_dtypes])
    }
    storages = {kv: storage.to(device) for kv, storage in storages.items()}

    def make_cache(kv: str, capacity_hint: int) -> QuantKVCache:
        return QuantKVCache.from_storage(config, storages[kv], capacity_hint)

    return make_cache


def _recipe_formats(scales_file: ScalesFile | None) -> tuple[list[str], list[str]]:
    """Per-layer K and V format names of the recipe in ``scales_file``; raise :class:`FP4KVError`
    when there is none."""
    recipe = None if scales_file is None else scales_file.recipe()
    if recipe is None:
        raise FP4KVError(
            "--kv-dtype recipe needs --scales with per-layer k_format/v_format; "
            "write one with fp4kv analyze --write-recipe"
        )
    return recipe


def gsm8k_prompts(
    settings: EvalSettings, questions: Sequence[dict[str, str]], train: Sequence[dict[str, str]], tokenizer: Any
) -> list[str]:
    """The prompt text of each of ``questions``: the tokenizer's chat template around the
    zero-shot instruction (``settings.chat``), else lm-eval's few-shot prompt drawn from ``train``."""
    if settings.chat:
        return [
            tokenizer.apply_chat_template(
                gsm8k.chat_messages(q["question"]), tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ]
    return gsm8k.fewshot_prompts(questions, train, settings.num_fewshot)


def teacher_forced_samples(
    tokenizer: Any, count: int, num_fewshot: int = 5
) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, gold_answer_ids)`` of the first ``count`` GSM8K test questions with the
    lm-eval few-shot prompt, as ``eval gsm8k`` measures fidelity on them."""
    questions, train = load_gsm8k("test")[:count], load_gsm8k("train")
    prompts = gsm8k.fewshot_prompts(questions, train, num_fewshot)
    answers = [_answer_ids(tokenizer, q["answer"], False) for q in questions]
    return list(zip(encode_prompts(tokenizer, prompts, False), answers))


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids per prompt; the tokenizer's own special tokens (BOS) unless the chat template
    already wrote them."""
    return tokenizer(list(prompts), add_special_tokens=not chat)["input_ids"]


def _answer_ids(tokenizer: Any, answer: str, chat: bool) -> list[int]:
    """Gold answer tokens as lm-eval appends a target: after a space (few-shot) or directly (chat)."""
    return tokenizer(answer if chat else f" {answer}", add_special_tokens=False)["input_ids"]


def stop_strings(tokenizer: Any) -> list[str]:
    """lm-eval's ``until`` list plus the tokenizer's EOS text."""
    stops = list(gsm8k.STOP_SEQUENCES)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def run_batch(
    model: Any,
    tokenizer: Any,
    ids: Sequence[Sequence[int]],
    cache: QuantKVCache,
    config: Any,
    stops: Sequence[str],
    decode: str,
    prefill_chunk: int,
    sampler: RowSampler | None = None,
) -> tuple[list[Continuation], dict[str, Any]]:
    """Generate one batch of prompts ``ids`` into ``cache`` (:func:`generate_batch` with its
    ``config``, ``stops``, ``decode`` read, ``prefill_chunk`` and ``sampler``, None: greedy) and
    time it; returns the continuations and the batch's stats: ``seconds``, ``decode_attention``
    (the read that ran), ``kv_bytes_per_token``, ``kv_stored_bytes``, ``kv_capacity_bytes``,
    ``peak_gpu_bytes`` (None off CUDA, on the model's input device) and ``prefill_row_chunk``."""
    cuda = input_device(model).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    continuations = generate_batch(model, tokenizer, ids, cache, config, stops, decode, prefill_chunk, sampler)
    seconds = time.perf_counter() - start
    stats = {
        "seconds": seconds,
        "decode_attention": decode_read(cache),
        "kv_bytes_per_token": cache.bytes_per_token(),
        "kv_stored_bytes": cache.stored_bytes(),
        "kv_capacity_bytes": cache.capacity_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "prefill_row_chunk": row_chunk(prefill_chunk, len(ids)),
    }
    return continuations, stats


#: ``rows -> (rows finished, their continuations, their stats)`` as rows finish (see :func:`_refill_runner`).
PoolRunner = Callable[
    [list[tuple[int, int]]], Iterator[tuple[list[tuple[int, int]], list[Continuation], list[dict[str, Any]]]]
]


def _refill_runner(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    make_cache: Callable[[int], QuantKVCache],
    config: Any,
    stops: Sequence[str],
    batch: int,
    settings: EvalSettings,
    device: torch.device,
) -> PoolRunner:
    """A :data:`PoolRunner` that generates ``(question, sample)`` rows through ``batch`` refilled
    slots (:func:`~fp4kv_cli.evaluate.refill.generate_refilled`)."""
    spec = settings.sampling

    def run(rows: list[tuple[int, int]]) -> Iterator[tuple[list[tuple[int, int]], list[Continuation], list[dict[str, Any]]]]:
        ids = [list(prompt_ids[i]) for i, _ in rows]
        sampler = None if spec is None else _sampler(spec, rows, device)
        for items, continuations, stats in generate_refilled(
            model, tokenizer, ids, make_cache, config, stops, batch, settings.prefill_chunk, sampler
        ):
            yield [rows[item] for item in items], continuations, [{**row, "refill": True} for row in stats]

    return run


def _generate_all(
    console: Console,
    kv: str,
    plan: _Plan,
    prompt_ids: Sequence[Sequence[int]],
    settings: EvalSettings,
    batch_size: int,
    run_batch: Callable[
        [list[list[int]], int, list[tuple[int, int]]], tuple[list[Continuation], dict[str, Any]]
    ],
    ranks: Ranks,
    on_saved: Callable[[], object],
    run_pool: PoolRunner | None = None,
) -> dict[tuple[int, int], dict[str, Any]]:
    """Score every ``(question, sample)`` with format ``kv``; those already in
    ``samples-<kv>.jsonl`` are skipped; ``on_saved()`` runs after each batch is logged. Rows go
    longest prompt first, a question's samples together, in batches of ``batch_size`` through
    ``run_batch``, or (``run_pool``: refilled slots) all together, logged as they finish; under a
    data-parallel launch this rank scores its share of the batches into its shard file."""
    sampled = settings.sampling is not None
    merged = samples_path(plan.run_dir, kv)
    done = SampleLog(merged, key=_record_key).load(repair=ranks.writer)
    order = _row_order(prompt_ids, settings.samples)
    todo = [row for row in order if row not in done]
    mine = ranks.share([todo[first : first + batch_size] for first in range(0, len(todo), batch_size)])
    log = SampleLog(shard_path(plan.run_dir, kv, ranks.rank) if ranks.parallel else merged, key=_record_key)
    with count_progress(console, remaining=True) as progress:
        task = progress.add_task(
            f"gsm8k {kv}" + (f" x{settings.samples} sampled" if sampled else "")
            + (f" (rank 0's share of {ranks.world})" if ranks.parallel else ""),
            total=len(order) - len(todo) + sum(map(len, mine)),
            completed=len(order) - len(todo),
        )
        mine_rows = [row for batch in mine for row in batch]
        chunks = (run_pool(mine_rows) if run_pool is not None and mine_rows
                  else _batched(mine, prompt_ids, settings, run_batch))  # fmt: skip
        for batch, continuations, stats in chunks:
            fresh = [
                sample_record(i, plan.questions[i], len(prompt_ids[i]), c, row, len(batch), k if sampled else None)
                for (i, k), c, row in zip(batch, continuations, stats)
            ]
            log.append(fresh)
            on_saved()
            done.update((_record_key(r), r) for r in fresh)
            progress.advance(task, len(batch))
    return done


def _batched(
    batches: list[list[tuple[int, int]]],
    prompt_ids: Sequence[Sequence[int]],
    settings: EvalSettings,
    run_batch: Callable[
        [list[list[int]], int, list[tuple[int, int]]], tuple[list[Continuation], dict[str, Any]]
    ],
) -> Iterator[tuple[list[tuple[int, int]], list[Continuation], list[dict[str, Any]]]]:
    """Each of ``batches`` through ``run_batch``, as a :data:`PoolRunner` yields finished rows."""
    for batch in batches:
        ids = [list(prompt_ids[i]) for i, _ in batch]
        continuations, stats = run_batch(ids, max(map(len, ids)) + settings.max_new_tokens, batch)
        yield batch, continuations, [{**stats, "refill": False}] * len(batch)


def _row_order(prompt_ids: Sequence[Sequence[int]], samples: int) -> list[tuple[int, int]]:
    """Every ``(question, sample)`` row in generation (and samples file) order: longest prompt
    first, a question's samples together."""
    rows = [(i, k) for i in range(len(prompt_ids)) for k in range(samples)]
    return sorted(rows, key=lambda row: (-len(prompt_ids[row[0]]), row))


def _record_key(record: dict[str, Any]) -> tuple[int, int]:
    """``(question index, sample number)`` of a sample record (greedy records: sample 0)."""
    return int(record["index"]), int(record.get("sample", 0))


def sample_record(
    index: int,
    question: dict[str, str],
    prompt_tokens: int,
    c: Continuation,
    stats: dict[str, Any],
    batch: int,
    sample: int | None = None,
) -> dict[str, Any]:
    """The ``samples-<kv>.jsonl`` record of question ``index`` (its ``sample``-th sample; None:
    greedy): the continuation ``c``, its strict and flexible answers and their scores, and its
    share of the batch's ``stats`` (from :func:`run_batch`, or a refilled run's rows handed out
    together; ``seconds`` over ``batch`` rows)."""
    strict, flexible = gsm8k.extract_strict(c.text), gsm8k.extract_flexible(c.text)
    return {
        "index": index,
        **({} if sample is None else {"sample": sample}),
        "question": question["question"],
        "answer": question["answer"],
        "gold": gsm8k.gold_answer(question["answer"]),
        "output": c.text,
        "raw_output": c.raw_text,
        "strict": strict,
        "flexible": flexible,
        "strict_correct": gsm8k.is_correct(strict, question["answer"]),
        "flexible_correct": gsm8k.is_correct(flexible, question["answer"]),
        "prompt_tokens": prompt_tokens,
        "new_tokens": c.new_tokens,
        "seconds": stats["seconds"] / batch,
        "kv_bytes_per_token": stats["kv_bytes_per_token"],
        "kv_stored_bytes": stats["kv_stored_bytes"],
        "kv_capacity_bytes": stats["kv_capacity_bytes"],
        "peak_gpu_bytes": stats["peak_gpu_bytes"],
        "decode_attention": stats["decode_attention"],
        "prefill_row_chunk": stats["prefill_row_chunk"],
        "refill": stats.get("refill", False),
    }


def summary_header(settings: EvalSettings, run_dir: Path, num_questions: int) -> dict[str, Any]:
    """The part of ``summary.json`` every GSM8K run shares, fp4kv's cache or an engine's: task,
    model, prompt, few-shot draw, stops, generation budget and batch size."""
    return {
        "task": "gsm8k",
        "model": settings.model,
        "run_dir": str(run_dir),
        "num_questions": num_questions,
        "prompt": "chat zero-shot CoT" if settings.chat else f"lm-eval gsm8k {settings.num_fewshot}-shot",
        "num_fewshot": 0 if settings.chat else settings.num_fewshot,
        "fewshot_seed": gsm8k.FEWSHOT_SEED,
        "stop_sequences": list(gsm8k.STOP_SEQUENCES),
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": "auto" if settings.batch_size is None else settings.batch_size,
    }


def _summary(
    settings: EvalSettings,
    plan: _Plan,
    device: torch.device,
    dtype: torch.dtype,
    records: dict[str, dict[tuple[int, int], dict[str, Any]]],
    fidelity: dict[str, Fidelity],
    example_prompt: str,
    batches: Mapping[str, BatchPlan | int],
) -> dict[str, Any]:
    import transformers

    shape = plan.shape
    bf16_cell = BF16KVMethod(torch.bfloat16).compute_cell_size(
        shape.num_kv_heads, shape.head_dim, shape.num_layers
    )
    sampled = settings.sampling is not None
    count = len(plan.questions)
    keys = [(i, k) for i in range(count) for k in range(settings.samples)]
    flags = {
        kv: {key: _flags(records[kv], key, count, settings) for key in ("strict", "flexible")} for kv in records
    }
    results = {}
    for kv in settings.kv_dtypes:
        rows = [records[kv][key] for key in keys]
        seconds = sum(r["seconds"] for r in rows)
        new_tokens = sum(r["new_tokens"] for r in rows)
        paired = plan_more = None
        if REFERENCE in records and kv != REFERENCE:
            compare = sampled_paired_difference if sampled else paired_difference
            paired = {key: compare(flags[kv][key], flags[REFERENCE][key]).to_dict() for key in flags[kv]}
            found = sample_plan(flags[kv]["strict"], flags[REFERENCE]["strict"]) if sampled else None
            plan_more = None if found is None else found.to_dict()
        score = sampled_accuracy if sampled else accuracy
        peaks = [r["peak_gpu_bytes"] for r in rows if r["peak_gpu_bytes"] is not None]
        results[kv] = {
            "scale_source": scale_source(kv, plan.scales_file),
            "k_centering": plan.k_offsets is not None and kv != REFERENCE,
            "qk_rotation": _rotation_block(kv, plan.scales_file),
            "accuracy": {key: score(values).to_dict() for key, values in flags[kv].items()},
            "vs_bf16": paired,
            "vs_bf16_samples_plan": plan_more,
            "new_tokens": new_tokens,
            "generation_seconds": seconds,
            "tokens_per_second": new_tokens / seconds if seconds > 0 else None,
            "kv_bytes_per_token": rows[0]["kv_bytes_per_token"],
            "kv_bytes_per_token_vs_bf16": rows[0]["kv_bytes_per_token"] / bf16_cell,
            "max_kv_capacity_bytes": max(r["kv_capacity_bytes"] for r in rows),
            "max_kv_stored_bytes": max(r["kv_stored_bytes"] for r in rows),
            "peak_gpu_bytes": max(peaks) if peaks else None,
            "decode_attention": sorted({r.get("decode_attention", OLD_DECODE_ATTENTION) for r in rows}),
            "batch_size": _batch(batches[kv]),
            "refilled_rows": sum(bool(r.get("refill")) for r in rows),
            "auto_batch": asdict(batches[kv]) if isinstance(batches[kv], BatchPlan) else None,
            "fidelity": fidelity[kv].to_dict() if kv in fidelity else None,
        }
        if kv == RECIPE:
            k_formats, v_formats = plan.scales_file.recipe()
            results[kv]["recipe"] = {"k": k_formats, "v": v_formats}
    return {
        **summary_header(settings, plan.run_dir, len(plan.questions)),
        "decoding": _decoding(settings),
        "prefill_chunk": settings.prefill_chunk,
        "device": str(device),
        "dtype": DTYPE_NAMES[dtype],
        "backend": get_backend(device).name,
        "scales": settings.scales,
        "kv_shape": asdict(shape),
        "bf16_kv_bytes_per_token": bf16_cell,
        "example_prompt": example_prompt,
        "versions": {
            "fp4kv": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "results": results,
    }


def _decoding(settings: EvalSettings) -> dict[str, Any]:
    """The summary's record of greedy or sampled decoding."""
    if settings.sampling is None:
        return {"mode": "greedy"}
    return {
        "mode": "sampled",
        "samples": settings.samples,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
    }


def _flags(
    records: Mapping[tuple[int, int], dict[str, Any]], key: str, questions: int, settings: EvalSettings
) -> list[Any]:
    """Per question, its ``key`` (strict / flexible) correctness: one flag (greedy) or the list of
    its first ``settings.samples`` samples' flags (sampled)."""
    if settings.sampling is None:
        return [records[i, 0][f"{key}_correct"] for i in range(questions)]
    return [[records[i, k][f"{key}_correct"] for k in range(settings.samples)] for i in range(questions)]


def _rotation_block(kv: str, scales_file: ScalesFile | None) -> int | None:
    """The Hadamard block of the Q/K rotation format ``kv`` ran with (None: not rotated)."""
    rotation = None if scales_file is None or kv == REFERENCE else scales_file.rotation()
    return None if rotation is None else rotation.block


def _batch(plan: BatchPlan | int) -> int:
    return plan.batch if isinstance(plan, BatchPlan) else plan


def scale_source(kv: str, scales_file: ScalesFile | None) -> str:
    """``none`` for a format without per-tensor scales, else ``calibrated`` (from the scales file,
    as the recipe always is) or ``dynamic``."""
    if kv != RECIPE and not KV_CACHE_METHOD_REGISTRY[kv].uses_tensor_scale:
        return "none"
    return "calibrated" if scales_file is not None else "dynamic"
