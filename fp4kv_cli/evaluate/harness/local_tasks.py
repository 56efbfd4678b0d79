"""lm-eval tasks whose data is read from local files instead of the hub.

:func:`local_task` takes an lm-eval task's own config (its YAML, includes and ``!function``\\ s
resolved by lm-eval's loader, so prompts, filters and metrics stay lm-eval's) and only swaps
its data source for ``datasets``' file builders over ``<split>.<ext>`` files in a folder, one
per split the task reads. ``gsm8k_local`` is lm-eval's ``gsm8k`` over fp4kv's shipped GSM8K
train and test splits (``fp4kv_cli/data/{train,test}.jsonl``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fp4kv_cli.data import LOCAL_BUILDERS, gsm8k_path
from fp4kv_cli.errors import FP4KVError

#: The shipped-data copy of lm-eval's gsm8k.
GSM8K_LOCAL = "gsm8k_local"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def local_task(task_manager: Any, task: str, folder: str | Path, name: str | None = None) -> dict[str, Any]:
    """lm-eval's config of ``task`` (a task, not a group) reading each of its splits from
    ``folder/<split>.{jsonl,json,parquet,csv}``, renamed ``name`` (default ``<task>_local``);
    pass it to ``simple_evaluate(tasks=[...])``."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index.get(task)
    if entry is None:
        raise FP4KVError(f"lm-eval has no task {task!r}; list them with lm-eval ls tasks")
    if entry.kind is not Kind.TASK or entry.yaml_path is None:
        raise FP4KVError(
            f"{task} is an lm-eval {entry.kind.name.lower()}, not a YAML task; point its tasks at local data one by one"
        )
    config = load_yaml(entry.yaml_path, resolve_func=True)
    if config.get("custom_dataset") is not None:
        raise FP4KVError(f"lm-eval task {task} builds its own dataset; it needs no local data")
    splits = sorted({config[key] for key in SPLIT_KEYS if config.get(key)})
    files = {split: _split_file(Path(folder).expanduser(), split, task) for split in splits}
    builders = {LOCAL_BUILDERS[Path(path).suffix] for path in files.values()}
    if len(builders) != 1:
        raise FP4KVError(f"the split files of {task} in {folder} mix file types; keep one type")
    config.update(
        task=name or f"{task}_local",
        dataset_path=builders.pop(),
        dataset_name=None,
        dataset_kwargs={"data_files": files},
    )
    return config


def gsm8k_local(task_manager: Any) -> dict[str, Any]:
    """lm-eval's ``gsm8k`` over the GSM8K splits fp4kv ships (no hub access)."""
    return local_task(task_manager, "gsm8k", gsm8k_path("test").parent, GSM8K_LOCAL)


def _split_file(folder: Path, split: str, task: str) -> str:
    found = [
        folder / f"{split}{suffix}" for suffix in LOCAL_BUILDERS if (folder / f"{split}{suffix}").is_file()
    ]
    found = [path for path in found if path.suffix != ".txt"]
    if not found:
        raise FP4KVError(
            f"lm-eval task {task} reads split {split!r}; put {split}.jsonl (or .json/.parquet/.csv) in {folder}"
        )
    return str(found[0])
