"""Run folder of ``fp4kv eval gsm8k``: config, per-sample JSONL logs, summary JSON and plot.

Layout of ``OUT/<run>/``: ``config.json`` (what was asked), ``samples-<kv>.jsonl`` (one line per
scored question, appended and flushed per finished batch), ``fidelity.json``, ``summary.json``
and ``summary.png``. A killed run resumes from the logs: finished question indices are skipped,
and a truncated last line (a write cut short) is dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fp4kv_cli.atomic import atomic_path, write_json_atomic
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.fidelity import Fidelity
from fp4kv_cli.validate import check_output_path

#: config.json keys that must be equal to resume a run (the rest, e.g. batch size, may change:
#: with a quantized cache the batch moves the prefill chunk boundaries, ``prefill_row_chunk`` in
#: each sample, which changes results only at the format's rounding level).
#: The decode read is one of them: the kernel and SDPA round differently, enough to move greedy
#: GSM8K accuracy by about a point, so one run's samples must all come from one read.
#: The sampling protocol is one too, but not the number of samples: a resumed run may add samples.
RESUME_KEYS = (
    "model", "data", "limit", "num_fewshot", "chat", "max_new_tokens", "scales", "dtype", "decode_attention",
    "temperature", "top_p", "seed", "prefill_chunk",
)  # fmt: skip

#: Values of RESUME_KEYS in config.json files written before the key existed (greedy, prefill in
#: one forward).
RESUME_KEY_DEFAULTS = {"decode_attention": "gather", "temperature": 0.0, "top_p": 1.0, "seed": 0, "prefill_chunk": None}


def check_run_dir(
    out: str | os.PathLike[str], run_name: str, config: Mapping[str, Any], resume: bool
) -> Path:
    """``out/run_name`` once it can take this run, creating and writing nothing: ``out`` must
    take new files, and an earlier run there needs ``resume`` and the same :data:`RESUME_KEYS`."""
    run_dir = Path(out).expanduser() / run_name
    config_path = run_dir / "config.json"
    check_output_path(config_path, "--out")
    if config_path.exists():
        if not resume:
            raise FP4KVError(
                f"{run_dir} holds an earlier run; pass --resume to continue it or another --run-name"
            )
        try:
            previous = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise FP4KVError(
                f"cannot read {config_path}: {err}; delete the run folder to start over"
            ) from None
        if not isinstance(previous, dict):
            raise FP4KVError(f"{config_path} is not a JSON object; delete the run folder to start over")
        changed = [
            key
            for key in RESUME_KEYS
            if previous.get(key, RESUME_KEY_DEFAULTS.get(key)) != config.get(key, RESUME_KEY_DEFAULTS.get(key))
        ]
        if changed:
            raise FP4KVError(
                f"cannot resume {run_dir}: {', '.join(changed)} differ from the earlier run; "
                "use the same settings or another --run-name"
            )
    return run_dir


def resolve_local_paths(record: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """``record`` with each of ``keys`` that names an existing local path made absolute (hub ids
    and None stay as they are), so a resumed run compares the same files however they were named."""
    for key in keys:
        if record[key] is not None and Path(record[key]).expanduser().exists():
            record[key] = str(Path(record[key]).expanduser().resolve())
    return record


def prepare_run_dir(
    out: str | os.PathLike[str], run_name: str, config: Mapping[str, Any], resume: bool
) -> Path:
    """Create (or, with ``resume``, reopen) ``out/run_name`` after :func:`check_run_dir`, and
    record ``config`` in it. Call it once every input is checked and the model has loaded, so a
    failed start leaves no run folder behind."""
    run_dir = check_run_dir(out, run_name, config, resume)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FP4KVError(f"cannot write to {run_dir}: {err.strerror or err}; pass a writable --out") from None
    write_json_atomic(run_dir / "config.json", dict(config))
    return run_dir


def samples_path(run_dir: Path, kv_dtype: str) -> Path:
    """``samples-<kv>.jsonl`` of a run."""
    return run_dir / f"samples-{kv_dtype}.jsonl"


class SampleLog:
    """Append-only JSONL of scored samples, one object per line, keyed by ``key(record)``
    (default: the ``"index"``)."""

    def __init__(self, path: Path, key: Callable[[dict[str, Any]], Hashable] | None = None) -> None:
        self.path = path
        self.key = key or (lambda record: int(record["index"]))

    def load(self, repair: bool = True) -> dict[Any, dict[str, Any]]:
        """Records by key. A last line without its newline or not valid JSON (a write cut short)
        is removed from the file (only skipped without ``repair``); any other bad line is an error."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]
        records: dict[Any, dict[str, Any]] = {}
        good_bytes = 0
        for number, line in enumerate(complete, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(complete) and not tail:
                    break
                raise FP4KVError(
                    f"{self.path}:{number} is not valid JSON; delete that line (or the file) and resume"
                ) from None
            records[self.key(record)] = record
            good_bytes += len(line) + 1
        if repair and good_bytes != len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(good_bytes)
        return records

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records`` as lines and flush them to disk."""
        text = "".join(json.dumps(dict(record), ensure_ascii=False) + "\n" for record in records)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def save_fidelity(run_dir: Path, samples: int, fidelity: Mapping[str, Fidelity]) -> None:
    """Write ``fidelity.json`` (per-format fidelity over the first ``samples`` questions)."""
    data = {"samples": samples, "results": {kv: f.to_dict() for kv, f in fidelity.items()}}
    write_json_atomic(run_dir / "fidelity.json", data)


def load_fidelity(run_dir: Path, samples: int, kv_dtypes: Sequence[str]) -> dict[str, Fidelity] | None:
    """Fidelity of an earlier session of this run, if it covered ``samples`` questions and every
    format in ``kv_dtypes``; else None (it is then measured again)."""
    path = run_dir / "fidelity.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    stored = data.get("results", {})
    if data.get("samples") != samples or any(kv not in stored for kv in kv_dtypes):
        return None
    return {kv: Fidelity(**stored[kv]) for kv in kv_dtypes}


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` atomically; returns its path."""
    path = run_dir / "summary.json"
    write_json_atomic(path, dict(summary))
    return path


def try_plot_summary(run_dir: Path, summary: Mapping[str, Any]) -> tuple[Path | None, str | None]:
    """:func:`plot_summary`, but a chart never fails a finished run: on any error the stale
    ``summary.png`` of an earlier session is removed and ``(None, reason)`` returned."""
    try:
        return plot_summary(run_dir, summary), None
    except Exception as err:  # noqa: BLE001  # the results are saved already; the chart is optional
        (run_dir / "summary.png").unlink(missing_ok=True)
        lines = str(err).strip().splitlines()
        return None, f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def plot_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Bar chart ``summary.png``: strict / flexible accuracy (95 % CI) and, when measured, KL per
    KV format."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = list(summary["results"])
    results = [summary["results"][kv] for kv in formats]
    with_kl = any(r.get("fidelity") for r in results)
    fig, axes = plt.subplots(1, 2 if with_kl else 1, figsize=(10 if with_kl else 6, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.38
    for offset, key, label in (
        (-width / 2, "strict", "strict-match"),
        (width / 2, "flexible", "flexible-extract"),
    ):
        means = [r["accuracy"][key]["mean"] for r in results]
        bounds = [r["accuracy"][key]["ci95"] or (m, m) for m, r in zip(means, results)]  # None: one question
        lows = [max(0.0, m - low) for m, (low, _) in zip(means, bounds)]
        highs = [max(0.0, high - m) for m, (_, high) in zip(means, bounds)]
        positions = [i + offset for i in range(len(formats))]
        ax.bar(positions, means, width, yerr=[lows, highs], capsize=3, label=label)
    ax.set_xticks(range(len(formats)), formats)
    ax.set_ylabel("GSM8K accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend()
    if with_kl:
        kl_ax = axes[0][1]
        kls = [r["fidelity"]["kl"] if r.get("fidelity") else 0.0 for r in results]
        kl_ax.bar(range(len(formats)), kls, color="tab:red")
        kl_ax.set_xticks(range(len(formats)), formats)
        kl_ax.set_ylabel("mean KL(bf16 || kv) per token [nats]")
    fig.suptitle(f"{summary['model']}: GSM8K, {summary['num_questions']} questions")
    fig.tight_layout()
    path = run_dir / "summary.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
