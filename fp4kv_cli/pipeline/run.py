"""``fp4kv run PRESET``: model -> calibrate -> export -> inspect -> eval -> report, re-runnable.

Every output goes under the preset's ``out`` folder. ``OUT/pipeline.json`` records, per step,
the key it ran with (its settings and the sha256 of the files it read) and its seconds; a step
whose output exists under the same key is skipped, so a second run redoes nothing and a changed
setting redoes only the steps it reaches. The eval step resumes its run folder (finished
questions are kept). The report (``report.json``, ``report.png``, a table) is rebuilt each run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.fetch import sha256_of
from fp4kv_cli.pipeline.preset import Preset

#: ``OUT/`` names of the outputs.
MODEL_DIR, SCALES, INSPECT, EVAL_RUN, STATE = "model", "scales.json", "inspect.json", "eval", "pipeline.json"


@dataclass
class Outcome:
    """What the pipeline produced: the paths, each step's timing and the pieces of the report."""

    out: Path
    model: str
    model_source: str
    scales: Path | None = None
    export_dir: Path | None = None
    export_report: dict[str, Any] | None = None
    inspect_report: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_preset(preset: Preset, root: Path, console: Console) -> Outcome:
    """Run ``preset`` (relative paths in it resolve against ``root``); returns the outcome after
    writing ``OUT/report.json`` and ``OUT/report.png``."""
    from fp4kv_cli.pipeline.report import write_report

    started, cpu = time.perf_counter(), time.process_time()
    out = _resolve(preset.out, Path.cwd())
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FP4KVError(f"cannot create {out}: {err.strerror or err}; set out in the preset to a writable folder") from None
    state = _State(out / STATE)
    source, model = _model(preset, out, state, console)
    outcome = Outcome(out=out, model=model, model_source=source)
    outcome.phases = state.phases
    if preset.scales is not None:
        outcome.scales = _resolve(preset.scales, root)
        if not outcome.scales.is_file():
            raise FP4KVError(f"scales file {outcome.scales} of the preset does not exist; fix key scales")
    elif preset.calibrate is not None:
        outcome.scales = _calibrate(preset, model, out, state, console)
    if preset.export is not None:
        outcome.export_dir, outcome.export_report = _export(preset, model, outcome.scales, out, state, console)
        outcome.inspect_report = state.step(
            "inspect", {"export": state.steps["export"]["key"]}, out / INSPECT,
            lambda: _inspect(outcome.export_dir, out / INSPECT), console,
        )  # fmt: skip
    if preset.eval is not None:
        outcome.summary = _eval(preset, model, outcome.scales, out, state, console)
    state.phases["total"] = {"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu, "ran": True}
    write_report(preset, outcome)
    return outcome


class _State:
    """``pipeline.json``: per step the key it last ran with and its seconds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.steps: dict[str, Any] = json.loads(path.read_text())["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            self.steps = {}
        #: This run's timing per step: seconds, whether it ran, and the seconds of its last real run.
        self.phases: dict[str, dict[str, Any]] = {}

    def step(self, name: str, key: dict[str, Any], output: Path, run: Callable[[], Any], console: Console) -> Any:
        """``run()`` unless ``output`` exists and the step last ran with ``key`` (then the
        recorded result is returned); records the key, result and seconds."""
        earlier = self.steps.get(name)
        if output.exists() and earlier is not None and earlier.get("key") == key:
            console.print(f"[dim]{name}: up to date ({output}), skipped[/]", highlight=False)
            self.phases[name] = {"seconds": 0.0, "ran": False, "seconds_when_run": earlier["seconds"]}
            return earlier.get("result")
        console.print(f"[bold]{name}[/] ...", highlight=False)
        start, cpu = time.perf_counter(), time.process_time()
        result = run()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        self.steps[name] = {"key": key, "seconds": seconds, "cpu_seconds": cpu, "result": result}
        self.phases[name] = {"seconds": seconds, "cpu_seconds": cpu, "ran": True, "seconds_when_run": seconds}
        write_json_atomic(self.path, {"steps": self.steps})
        console.print(f"{name}: {seconds:.1f} s ({cpu:.1f} s CPU)", highlight=False)
        return result


def _model(preset: Preset, out: Path, state: _State, console: Console) -> tuple[str, str]:
    """``(source, model to load)``: the fetched or given model, converted into ``OUT/model``
    when it is a GGUF and the preset asks for it."""
    spec = preset.model
    if spec.fetch is not None:
        from fp4kv_cli.fetch import fetch_model

        start = time.perf_counter()
        with console.status(f"fetching {spec.fetch} (once; kept in ~/.cache/fp4kv/models)"):
            source = str(fetch_model(spec.fetch))
        state.phases["fetch"] = {"seconds": time.perf_counter() - start, "ran": True}
    else:
        source = spec.path
        if Path(source).expanduser().exists():
            source = str(Path(source).expanduser().resolve())
    if not (spec.convert and source.endswith(".gguf")):
        return source, source
    folder = out / MODEL_DIR

    def convert() -> None:
        from fp4kv_cli.models import convert_gguf_to_folder

        with console.status(f"converting {source} into {folder} (once)"):
            convert_gguf_to_folder(source, folder, overwrite=True)

    state.step("convert", {"gguf": source, "size": Path(source).stat().st_size}, folder / "config.json", convert, console)
    return source, str(folder)


def _calibrate(preset: Preset, model: str, out: Path, state: _State, console: Console) -> Path:
    spec = preset.calibrate
    path = out / SCALES

    def calibrate() -> None:
        from fp4kv_cli.calibration import calibrate as run_calibration
        from fp4kv_cli.data import DEFAULT_DATASET, load_texts
        from fp4kv_cli.models import load_model_and_tokenizer
        from fp4kv_cli.progress import count_progress
        from fp4kv_cli.quant.scales import parse_scales

        texts = load_texts(spec.dataset, "train", None, spec.num_samples)
        with console.status(f"loading {model}"):
            loaded, tokenizer = load_model_and_tokenizer(model, device=spec.device, dtype=spec.dtype)
        with count_progress(console) as progress:
            task = progress.add_task("calibrate (tokens)", total=None)
            data = run_calibration(
                loaded, tokenizer, texts, seq_len=spec.seq_len, batch_size=spec.batch_size,
                per_head=spec.per_head, center_k=spec.center_k, model_id=model,
                dataset=spec.dataset or DEFAULT_DATASET, split="train",
                on_batch=lambda tokens, total: progress.update(task, advance=tokens, total=total),
            )  # fmt: skip
        parse_scales(data, source="calibration result")
        write_json_atomic(path, data)

    state.step("calibrate", {"model": model, "settings": spec.model_dump()}, path, calibrate, console)
    return path


def _export(
    preset: Preset, model: str, scales: Path, out: Path, state: _State, console: Console
) -> tuple[Path, dict[str, Any]]:
    from fp4kv_cli.export.exporter import ExportRequest, export_scales

    spec = preset.export
    folder = out / f"export-{spec.kv_dtype}-{spec.format}"
    if spec.format == "json":
        folder = folder.with_suffix(".json")
    if not Path(model).is_dir():
        raise FP4KVError(f"export needs a model folder, got {model}; set model.convert = true for a GGUF")

    def export() -> dict[str, Any]:
        result = export_scales(
            ExportRequest(
                scales=scales, out=folder, kv_dtype=spec.kv_dtype, fmt=spec.format, model_dir=Path(model),
                convention=spec.convention, engine=spec.engine, target=spec.target, overwrite=True,
                per_head=spec.per_head,
            )
        )  # fmt: skip
        return result.report

    key = {"model": model, "scales": sha256_of(scales), "settings": spec.model_dump()}
    report = state.step("export", key, folder, export, console)
    return folder, report


def _inspect(export_dir: Path, path: Path) -> dict[str, Any]:
    from fp4kv_cli.export.inspect import inspect_path, write_inspect_json

    report = inspect_path(export_dir)
    write_inspect_json(report, path)
    return report


def _eval(preset: Preset, model: str, scales: Path | None, out: Path, state: _State, console: Console) -> dict[str, Any]:
    from fp4kv_cli.evaluate.runner import EvalSettings, run_gsm8k

    spec = preset.eval
    settings = EvalSettings(
        model=model, kv_dtypes=tuple(spec.kv_dtypes), scales=None if scales is None else str(scales),
        num_fewshot=spec.num_fewshot, limit=spec.limit, batch_size=spec.batch_size,
        max_new_tokens=spec.max_new_tokens, device=spec.device, dtype=spec.dtype, fidelity=spec.fidelity,
        fidelity_samples=spec.fidelity_samples, out=str(out), run_name=EVAL_RUN, resume=True,
        decode_attention=spec.decode_attention,
    )  # fmt: skip
    summary_path = out / EVAL_RUN / "summary.json"
    key = {"model": model, "scales": None if scales is None else sha256_of(scales), "settings": spec.model_dump()}
    def evaluate() -> None:
        try:
            run_gsm8k(settings, console)
        except FP4KVError as err:
            if "cannot resume" not in str(err):
                raise
            raise FP4KVError(
                f"{out / EVAL_RUN} holds an eval with other settings ({str(err).split(': ', 1)[-1].split(';')[0]}); "
                f"delete that folder to run the preset's, or set another out"
            ) from None

    state.step("eval", key, summary_path, evaluate, console)
    return json.loads(summary_path.read_text())


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


