"""``fp4kv run PRESET``: one preset of ``configs/`` end to end (calibrate -> export -> inspect -> eval)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fp4kv_cli.cli.app import app, console, err_console, guarded

#: Width of the report table when output is not a terminal (logs, CI), so it is not wrapped.
TABLE_WIDTH = 150


@app.command("run")
@guarded
def run_command(
    preset: Annotated[Path, typer.Argument(help="A preset TOML file, e.g. configs/quickstart-cpu.toml.")],
) -> None:
    """Run a preset's pipeline; steps whose outputs exist with the same settings are skipped."""
    from fp4kv_cli.pipeline.preset import load_preset
    from fp4kv_cli.pipeline.report import report_table
    from fp4kv_cli.pipeline.run import run_preset

    spec = load_preset(preset)
    outcome = run_preset(spec, preset.resolve().parent, err_console)
    report = json.loads((outcome.out / "report.json").read_text())
    if "eval" in report:
        (console if console.is_terminal else Console(width=TABLE_WIDTH)).print(report_table(report))
    phases = ", ".join(
        f"{name} {p['seconds']:.0f} s" + ("" if p["ran"] else " (skipped)") for name, p in report["phases"].items()
    )
    console.print(f"phases: {phases}", highlight=False)
    files = report["files"]
    console.print(f"results in {outcome.out}/ (report.json, report.png); model {files['model']}", highlight=False)
