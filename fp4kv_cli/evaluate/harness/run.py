"""``fp4kv eval lm-eval``: lm-eval's evaluator on the ``fp4kv`` model, one KV format after another.

The model is loaded once; each format runs ``lm_eval.simple_evaluate`` with lm-eval's task
definitions, filters and metrics, and lm-eval's ``EvaluationTracker`` writes its usual files
(``results_<date>.json``, ``samples_<task>_<date>.jsonl``) under ``OUT/<kv>/``. With bf16 among
the formats, every other format's per-document metric values are paired with bf16's (mean
difference, 95 % interval, minimum detectable difference) and ``OUT/summary.json`` holds the
table.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.harness.local_tasks import GSM8K_LOCAL, gsm8k_local, local_task
from fp4kv_cli.evaluate.metrics import PairedDifference, paired_values
from fp4kv_cli.evaluate.runner import REFERENCE, parse_kv_dtypes


@dataclass(frozen=True)
class HarnessSettings:
    """What ``fp4kv eval lm-eval`` was asked to do (see the CLI options)."""

    model_args: str
    tasks: tuple[str, ...]
    kv_dtypes: tuple[str, ...] | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 16
    device: str = "auto"
    out: str = "results/lm-eval"
    include_path: str | None = None
    local_data: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    log_samples: bool = True
    gen_kwargs: str | None = None


def parse_model_args(text: str) -> dict[str, Any]:
    """lm-eval's ``key=value,...`` model arguments (its own parser); ``pretrained`` is required."""
    from lm_eval.utils import simple_parse_args_string

    try:
        args = simple_parse_args_string(text)
    except (ValueError, IndexError) as err:
        raise FP4KVError(f"cannot read --model-args {text!r}: {err}; write key=value,key=value") from None
    if "pretrained" not in args:
        raise FP4KVError("--model-args needs pretrained=<model folder, .gguf file or hub id>")
    return args


def parse_local_data(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["hellaswag=/data/hs"]`` -> ``(("hellaswag", "/data/hs"),)``; folders must exist."""
    pairs = []
    for item in items:
        task, sep, folder = item.partition("=")
        if not sep or not task or not folder:
            raise FP4KVError(f"--local-data takes TASK=FOLDER, got {item!r}")
        if not Path(folder).expanduser().is_dir():
            raise FP4KVError(
                f"--local-data folder {folder} does not exist; pass a folder of <split>.jsonl files"
            )
        pairs.append((task.strip(), folder))
    return tuple(pairs)


def run_lm_eval(settings: HarnessSettings, console: Console) -> dict[str, Any]:
    """Evaluate every format; returns the summary (also ``OUT/summary.json``)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    import fp4kv_cli.evaluate.harness  # noqa: F401  (registers the model)
    from fp4kv_cli.evaluate.harness.model import FP4KVLM

    started = time.perf_counter()
    args = parse_model_args(settings.model_args)
    kv_dtypes = settings.kv_dtypes or parse_kv_dtypes(str(args.get("kv_dtype", "nvfp4")))
    if settings.limit is not None and settings.limit <= 0:
        raise FP4KVError(f"--limit must be > 0, got {settings.limit}")
    if settings.batch_size <= 0:
        raise FP4KVError(f"--batch-size must be > 0, got {settings.batch_size}")
    task_manager = cached_task_manager(settings.include_path)
    specs = _task_specs(task_manager, settings.tasks, settings.local_data)
    out = Path(settings.out).expanduser()
    args = {**args, "kv_dtype": kv_dtypes[0], "batch_size": settings.batch_size}
    args.setdefault("device", settings.device)
    with console.status(f"loading {args['pretrained']}"):
        lm = FP4KVLM(**args)
    per_format: dict[str, Any] = {}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kv in kv_dtypes:
        lm.set_kv_dtype(kv)
        tracker = EvaluationTracker(output_path=str(out / kv))
        console.print(f"lm-eval {', '.join(settings.tasks)} with the KV cache in {kv}", highlight=False)
        result = lm_eval.simple_evaluate(
            model=lm,
            model_args=",".join(
                f"{key}={value}" for key, value in {**args, "kv_dtype": kv}.items()
            ),  # recorded
            tasks=specs,
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            log_samples=settings.log_samples,
            evaluation_tracker=tracker,
            gen_kwargs=settings.gen_kwargs,
            task_manager=task_manager,
        )
        samples[kv] = result.pop("samples", {}) if settings.log_samples else {}
        tracker.save_results_aggregated(results=result, samples=samples[kv] or None)
        for task in samples[kv]:
            tracker.save_results_samples(task_name=task, samples=samples[kv][task])
        per_format[kv] = result["results"]
    summary = {
        "model_args": settings.model_args,
        "tasks": list(settings.tasks),
        "kv_dtypes": list(kv_dtypes),
        "settings": asdict(settings),
        "results": _metrics(per_format),
        "vs_bf16": _paired_metrics(samples) if REFERENCE in samples and len(samples) > 1 else None,
        "out": str(out),
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


@functools.lru_cache(maxsize=4)
def cached_task_manager(include_path: str | None = None) -> Any:
    """lm-eval's ``TaskManager`` (its index of every task YAML takes seconds to build), once per
    ``include_path`` in a process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _task_specs(task_manager: Any, tasks: Sequence[str], local_data: Sequence[tuple[str, str]]) -> list[Any]:
    """Task names (or YAML paths) as lm-eval takes them; ``gsm8k_local`` and ``--local-data``
    tasks as configs reading local files. Unknown names fail here, before the model loads."""
    local = dict(local_data)
    unknown = set(local) - set(tasks)
    if unknown:
        raise FP4KVError(
            f"--local-data names {', '.join(sorted(unknown))}, not in --tasks; add them to --tasks"
        )
    specs: list[Any] = []
    for task in tasks:
        if task == GSM8K_LOCAL:
            specs.append(gsm8k_local(task_manager))
        elif task in local:
            specs.append(local_task(task_manager, task, local[task], name=task))
        elif task in task_manager.all_tasks or Path(task).is_file():
            specs.append(task)
        else:
            raise FP4KVError(
                f"lm-eval has no task {task!r}; list them with lm-eval ls tasks, or pass --include-path DIR"
            )
    return specs


def _metrics(per_format: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """``{task: {"metric,filter": {kv: {"value": v, "stderr": s}}}}`` from lm-eval's results."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for kv, results in per_format.items():
        for task, values in results.items():
            for key, value in values.items():
                if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                metric, _, filt = key.partition(",")
                stderr = values.get(f"{metric}_stderr,{filt}")
                cell = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
                table.setdefault(task, {}).setdefault(key, {})[kv] = cell
    return table


def _paired_metrics(samples: Mapping[str, Mapping[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per task, metric and filter, each format's per-document difference from bf16."""
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    reference = samples[REFERENCE]
    for kv, tasks in samples.items():
        if kv == REFERENCE:
            continue
        for task, rows in tasks.items():
            for key, diff in _task_differences(rows, reference.get(task, [])).items():
                paired.setdefault(task, {}).setdefault(key, {})[kv] = diff.to_dict()
    return paired


def _task_differences(
    rows: list[dict[str, Any]], reference: list[dict[str, Any]]
) -> dict[str, PairedDifference]:
    """``{"metric,filter": difference}`` over the documents both sample lists scored."""

    def by_doc(items: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
        return {(item["filter"], item["doc_id"]): item for item in items}

    ours, theirs = by_doc(rows), by_doc(reference)
    shared = sorted(set(ours) & set(theirs))
    metrics = [m for m in (rows[0]["metrics"] if rows else []) if m in rows[0]]
    out = {}
    for metric in metrics:
        for filt in sorted({f for f, _ in shared}):
            docs = [key for key in shared if key[0] == filt]
            values = [(ours[d][metric], theirs[d][metric]) for d in docs]
            if values and all(isinstance(a, (int, float)) and isinstance(b, (int, float)) for a, b in values):
                out[f"{metric},{filt}"] = paired_values([float(a) - float(b) for a, b in values])
    return out
