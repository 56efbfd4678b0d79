"""``fp4kv convert``: dequantize a ``.gguf`` model into a reusable Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fp4kv_cli.cli.app import app, console, guarded


@app.command("convert")
@guarded(oom_fix="convert on a machine with more memory, or use --dtype bf16")
def convert(
    gguf: Annotated[Path, typer.Argument(help="The .gguf model file to convert.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (model + tokenizer).")],
    dtype: Annotated[str, typer.Option(help="Weight dtype of the folder: bf16, fp16, fp32.")] = "bf16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Dequantize a GGUF model once; later commands then load the folder in seconds."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.models import convert_gguf_to_folder, parse_dtype

    written = convert_gguf_to_folder(gguf, out, dtype=parse_dtype(dtype), overwrite=overwrite)
    console.print(f"wrote {written}")
