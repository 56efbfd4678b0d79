"""``fp4kv methods``: the registered KV formats and what they cost for a given model."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fp4kv_cli.cli.app import app, console, guarded
from fp4kv_cli.model_config import KVShape, load_config_dict

#: The shape used when no model is given: Qwen2.5-1.5B (28 layers, 2 KV heads, head_dim 128).
DEFAULT_SHAPE = KVShape(num_layers=28, num_kv_heads=2, head_dim=128, model_type="qwen2 (default)")


@app.command("methods")
@guarded
def methods(
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model folder, config.json, .gguf file or hub id whose KV shape to use."),
    ] = None,
    mem_gib: Annotated[float, typer.Option("--mem-gib", min=0.001, help="KV memory budget in GiB.")] = 16.0,
) -> None:
    """List the KV cache formats with bits per element, bytes per token and tokens per budget."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.quant.registry import FP4_KV_CACHE_QUANT_REGISTRY, KV_CACHE_METHOD_REGISTRY

    shape = DEFAULT_SHAPE if model is None else KVShape.from_config(load_config_dict(model))
    table = Table(
        title=(
            f"KV formats for {model or 'the default shape'}: {shape.num_layers} layers, "
            f"{shape.num_kv_heads} KV heads, head_dim {shape.head_dim}"
        )
    )
    for column in ("format", "FP4 method", "bits/elem", "bytes/token", "vs bf16", f"tokens in {mem_gib:g} GiB"):
        table.add_column(column, justify="left" if column in ("format", "FP4 method") else "right")
    bf16_cell = KV_CACHE_METHOD_REGISTRY["bf16"]().compute_cell_size(
        shape.num_kv_heads, shape.head_dim, shape.num_layers
    )
    for name, method_cls in KV_CACHE_METHOD_REGISTRY.items():
        method = method_cls()
        if name in FP4_KV_CACHE_QUANT_REGISTRY and shape.head_dim % method.SCALE_BLOCK_SIZE:
            table.add_row(name, "yes", f"{method.bits_per_element:g}", "n/a", "n/a", "head_dim % 16 != 0")
            continue
        cell = method.compute_cell_size(shape.num_kv_heads, shape.head_dim, shape.num_layers)
        table.add_row(
            name,
            "yes" if name in FP4_KV_CACHE_QUANT_REGISTRY else "",
            f"{method.bits_per_element:g}",
            f"{cell:,}",
            f"{cell / bf16_cell:.4f}x",
            f"{int(mem_gib * 2**30 // cell):,}",
        )
    console.print(table)
