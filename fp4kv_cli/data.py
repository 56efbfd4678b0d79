"""Text data: the shipped GSM8K splits and calibration texts from local files or the hub."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from fp4kv_cli.errors import FP4KVError

GSM8K_SPLITS = ("train", "test")
GSM8K_FIELDS = ("question", "answer")
#: File suffixes ``datasets`` reads offline, mapped to its builder names.
LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
#: Name of the default calibration dataset (the shipped GSM8K train split).
DEFAULT_DATASET = "gsm8k"


def gsm8k_path(split: str) -> Path:
    """Path of the GSM8K ``split`` (``"train"`` or ``"test"``) shipped as package data."""
    if split not in GSM8K_SPLITS:
        raise FP4KVError(f"unknown GSM8K split {split!r}; use one of {', '.join(GSM8K_SPLITS)}")
    return Path(str(resources.files("fp4kv_cli") / "data" / f"{split}.jsonl"))


def load_gsm8k(split: str = "test", path: str | Path | None = None) -> list[dict[str, str]]:
    """GSM8K rows ``{"question": str, "answer": str}`` from the shipped split or a local jsonl copy.

    Parameters
    ----------
    split
        ``"train"`` or ``"test"``; ignored when ``path`` is given.
    path
        Another local GSM8K jsonl file (one JSON object per line with both fields).
    """
    source = Path(path) if path is not None else gsm8k_path(split)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FP4KVError(f"GSM8K file {source} does not exist; pass an existing jsonl file") from None
    except OSError as err:
        raise FP4KVError(f"cannot read GSM8K file {source}: {err}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FP4KVError(
                f"{source}:{number} is not valid JSON ({err.msg}); fix or re-export the file"
            ) from None
        missing = [field for field in GSM8K_FIELDS if not isinstance(row, dict) or field not in row]
        if missing:
            raise FP4KVError(
                f"{source}:{number} has no {' / '.join(missing)} field; GSM8K rows need question and answer"
            )
        rows.append({"question": str(row["question"]), "answer": str(row["answer"])})
    if not rows:
        raise FP4KVError(f"GSM8K file {source} has no rows; pass a non-empty jsonl file")
    return rows


def load_texts(
    dataset: str | None = None,
    split: str | None = None,
    text_field: str | None = None,
    num_samples: int | None = None,
) -> list[str]:
    """Calibration texts, in dataset order, at most ``num_samples`` of them.

    Parameters
    ----------
    dataset
        ``None`` or ``"gsm8k"``: the shipped GSM8K split (question, a newline, answer). Otherwise
        a local json/jsonl/parquet/csv/txt file or a folder of such files (read offline with
        ``datasets``), or a hub dataset name (needs the hub).
    split
        Dataset split; default ``"train"``.
    text_field
        Column holding the text; default ``"text"`` for files and hub datasets (GSM8K: question +
        answer unless a field is named).
    num_samples
        Keep the first ``num_samples`` non-empty texts (all when ``None``).
    """
    split = split or "train"
    if dataset in (None, DEFAULT_DATASET):
        texts = _gsm8k_texts(split, text_field)
    else:
        texts = _dataset_texts(dataset, split, text_field or "text")
    texts = [text for text in texts if text.strip()]
    if num_samples is not None:
        texts = texts[:num_samples]
    if not texts:
        raise FP4KVError(
            f"dataset {dataset or DEFAULT_DATASET} ({split}) has no non-empty texts; pass other data"
        )
    return texts


def _gsm8k_texts(split: str, text_field: str | None) -> list[str]:
    rows = load_gsm8k(split)
    if text_field is None:
        return [f"{row['question']}\n{row['answer']}" for row in rows]
    if text_field not in GSM8K_FIELDS:
        raise FP4KVError(f"GSM8K has no field {text_field!r}; use question or answer (or omit --text-field)")
    return [row[text_field] for row in rows]


def _dataset_texts(dataset: str, split: str, text_field: str) -> list[str]:
    table = _load_dataset(dataset, split)
    if text_field not in table.column_names:
        raise FP4KVError(
            f"dataset {dataset} has no field {text_field!r} (fields: {', '.join(table.column_names)}); "
            "pass --text-field"
        )
    return [str(value) for value in table[text_field] if value is not None]


def _load_dataset(dataset: str, split: str) -> Any:
    import datasets

    path = Path(dataset).expanduser()
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Generating train split" bars would break one-line errors
    try:
        if path.exists():
            builder, files = _local_files(path)
            return datasets.load_dataset(builder, data_files={split: files}, split=split)
        if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in LOCAL_BUILDERS:
            raise FP4KVError(f"dataset file {dataset} does not exist; check the path")
        return datasets.load_dataset(dataset, split=split)
    except FP4KVError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:  # hub, file and Arrow errors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FP4KVError(
            f"cannot load dataset {dataset!r} split {split!r}: {first}; pass a local json/jsonl/parquet/csv/txt file"
        ) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise FP4KVError(f"{path} is not a {'/'.join(sorted(LOCAL_BUILDERS))} file; convert it to one")
        if path.stat().st_size == 0:
            raise FP4KVError(f"dataset file {path} is empty; pass a file with texts")
        return builder, [str(path)]
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_BUILDERS and p.stat().st_size
    )
    builders = {LOCAL_BUILDERS[p.suffix] for p in files}
    if not files:
        raise FP4KVError(
            f"folder {path} holds no non-empty {'/'.join(sorted(LOCAL_BUILDERS))} file; pass a data file"
        )
    if len(builders) > 1:
        raise FP4KVError(f"folder {path} mixes file types ({', '.join(sorted(builders))}); keep one type")
    return builders.pop(), [str(p) for p in files]
