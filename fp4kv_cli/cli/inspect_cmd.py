"""``fp4kv inspect``: a checkpoint's (or scales file's) KV scales, their convention and hazards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fp4kv_cli.cli.app import app, console, guarded


@app.command("inspect")
@guarded
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Model folder, scales.json, or fp4kv_kv_scales.json sidecar.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also save the report as JSON here.")
    ] = None,
) -> None:
    """Show KV scales, which convention they are in (or both readings if ambiguous) and hazards."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.export.inspect import inspect_path, inspect_table, write_inspect_json

    report = inspect_path(path)
    console.print(inspect_table(report))
    if not report["hazards"]:
        console.print("[green]no hazards found[/]")
    for hazard in report["hazards"]:
        console.print(f"[red]hazard:[/] {hazard}", highlight=False)
    if json_out is not None:
        write_inspect_json(report, json_out)
        console.print(f"report saved to {json_out}", highlight=False)
