"""``fp4kv inspect``: a checkpoint's (or scales file's) KV scales, their convention and hazards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box

from fp4kv_cli.cli.app import app, console, guarded
from fp4kv_cli.validate import check_output_path

#: Exit code of ``fp4kv inspect`` when it reports hazards (0: none; 2: bad input).
HAZARD_EXIT_CODE = 3


@app.command("inspect")
@guarded
def inspect_cmd(
    path: Annotated[Path, typer.Argument(help="Model folder, scales.json, or fp4kv_kv_scales.json sidecar.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also save the report as JSON here.")
    ] = None,
) -> None:
    """Show KV scales, which convention they are in (or both readings if ambiguous) and hazards.

    Exit code 0: no hazards; 3: hazards reported (scripts can test it); 2: bad input.
    """
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.export.inspect import inspect_path, inspect_table, write_inspect_json

    if json_out is not None:
        check_output_path(json_out, "--json")
    report = inspect_path(path)
    table = inspect_table(report)
    if console.measure(table, options=console.options.update_width(10_000)).maximum > console.width:
        # No column rules or edge padding: 80 columns hold every number uncut.
        table.box, table.pad_edge, table.collapse_padding = box.SIMPLE_HEAD, False, True
    console.print(table)
    if not report["hazards"]:
        console.print("[green]no hazards found[/]")
    for hazard in report["hazards"]:
        console.print(f"[red]hazard:[/] {hazard}", highlight=False)
    if json_out is not None:
        write_inspect_json(report, json_out)
        console.print(f"report saved to {json_out}", highlight=False)
    if report["hazards"]:
        raise typer.Exit(code=HAZARD_EXIT_CODE)
