"""``fp4kv calibrate``: KV amax per layer (and head) of a real model over calibration texts."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.cli.app import DeviceMapOption, MaxMemoryOption, app, console, guarded
from fp4kv_cli.data import DEFAULT_DATASET, load_texts
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.progress import LoggedProgress, status
from fp4kv_cli.validate import check_output_path, locate_model

#: A layer is an outlier when its amax exceeds this multiple of the median over layers.
OUTLIER_FACTOR = 4.0


class TokensPerSecondColumn(ProgressColumn):
    """Throughput of a task whose progress is counted in tokens."""

    def render(self, task: Task) -> Text:
        """``"12,345 tok/s"``, or a dash before the first batch."""
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")


@app.command("calibrate")
@guarded(oom_fix="lower --batch-size or --seq-len")
def calibrate_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Model folder, .gguf file or hub id.")],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Local json/jsonl/parquet/csv/txt file or folder, or a hub dataset name; "
            "default: the shipped GSM8K (question + answer)."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="Dataset split.")] = "train",
    text_field: Annotated[
        str | None, typer.Option(help="Column holding the text (default: text; GSM8K: question + answer).")
    ] = None,
    num_samples: Annotated[int, typer.Option(help="Texts to calibrate on (the first N).")] = 512,
    seq_len: Annotated[int, typer.Option(help="Tokens kept per text (longer ones are truncated).")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Texts per forward pass.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    dtype: Annotated[
        str, typer.Option(help="Model dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32.")
    ] = "auto",
    per_head: Annotated[
        bool, typer.Option("--per-head/--no-per-head", help="Also record amax per KV head (as analyze and export use).")
    ] = True,
    center_k: Annotated[
        bool,
        typer.Option(
            "--center-k", help="Record the per-channel K mean (k_offset); k_amax is then of K - mean."
        ),
    ] = False,
    qk_rotation: Annotated[
        str | None,
        typer.Option(
            "--qk-rotation",
            help="Record K as a cache rotating Q/K stores it: Hadamard blocks of this many channels "
            "(16, as SGLang --qkrot-block 16) or head_dim (ModelOpt NVFP4_KV_ROTATE_CFG); after --center-k.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="scales.json to write.")] = Path("scales.json"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
) -> None:
    """Capture post-RoPE K and V at the KV cache write; save their amax, percentiles and top channels."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.calibration import calibrate
    from fp4kv_cli.models import load_model_and_tokenizer
    from fp4kv_cli.quant.rotation import QKRotation
    from fp4kv_cli.quant.scales import parse_scales

    for name, value in (("--num-samples", num_samples), ("--seq-len", seq_len), ("--batch-size", batch_size)):
        if value <= 0:
            raise FP4KVError(f"{name} must be > 0, got {value}; pass a positive number")
    if out.exists() and not overwrite:
        raise FP4KVError(f"{out} already exists; pass --overwrite or another --out")
    check_output_path(out, "--out")
    if qk_rotation is not None and qk_rotation.strip().lower() not in ("head_dim", "full"):
        QKRotation.parse(qk_rotation)  # a bad block size fails before the model loads
    locate_model(model)  # a missing path, bad GGUF or unreachable hub fails before torch loads
    texts = load_texts(dataset, split, text_field, num_samples)
    note = " (dequantizing the GGUF: about a minute per billion weights)" if model.endswith(".gguf") else ""
    with status(console, f"loading {model}{note}"):
        loaded, tokenizer = load_model_and_tokenizer(
            model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory
        )
    rotation = None if qk_rotation is None else QKRotation.parse(qk_rotation, _head_dim(loaded.config))
    with LoggedProgress(
        TextColumn("calibrating"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} tokens"),
        TokensPerSecondColumn(),
        TimeElapsedColumn(),
        console=console,
        unit="tokens",
    ) as progress:
        task = progress.add_task("calibrating", total=None)

        def advance(tokens: int, total: int) -> None:
            progress.update(task, advance=tokens, total=total)

        data = calibrate(
            loaded,
            tokenizer,
            texts,
            seq_len=seq_len,
            batch_size=batch_size,
            per_head=per_head,
            center_k=center_k,
            rotation=rotation,
            model_id=model,
            dataset=dataset or DEFAULT_DATASET,
            split=split,
            text_field=text_field,
            on_batch=advance,
        )
    parse_scales(data, source="calibration result")
    write_json_atomic(out, data)
    console.print(summary_table(data))
    console.print(f"wrote {out}")


def _head_dim(config: Any) -> int:
    text = config.get_text_config(decoder=True)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def outlier_layers(data: dict[str, Any], key: str) -> list[int]:
    """Layers whose ``key`` amax exceeds :data:`OUTLIER_FACTOR` times the median over layers."""
    values = [layer[key] for layer in data["layers"]]
    median = statistics.median(values)
    return [layer["index"] for layer in data["layers"] if layer[key] > OUTLIER_FACTOR * median]


def summary_table(data: dict[str, Any]) -> Table:
    """Per-layer amax (K centered and raw with ``--center-k``), p99.9 and top K channel; the amax
    ranges and outlier layers as caption."""
    layers = data["layers"]
    calib = data["calibration"]
    k_out, v_out = outlier_layers(data, "k_amax"), outlier_layers(data, "v_amax")
    centered = calib.get("center_k", False)
    table = Table(
        title=(
            f"{data['model']['id']}: {calib['num_tokens']:,} tokens from {calib['num_samples']} samples "
            f"of {calib['dataset']}" + (" (K centered)" if centered else "")
        ),
        caption=(
            f"K amax {min(l['k_amax'] for l in layers):.4g}..{max(l['k_amax'] for l in layers):.4g}, "
            f"V amax {min(l['v_amax'] for l in layers):.4g}..{max(l['v_amax'] for l in layers):.4g}; "
            f"outlier layers (> {OUTLIER_FACTOR:g}x median): K {k_out or 'none'}, V {v_out or 'none'}"
        ),
    )
    columns = (
        ["layer", "type", "K amax"]
        + (["K raw"] if centered else [])
        + ["K p99.9", "V amax", "V p99.9", "top K h:c"]
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("type", "top K h:c") else "right")
    for layer in layers:
        top = layer["k_top_channels"][0]
        mark = " *" if layer["index"] in k_out or layer["index"] in v_out else ""
        row = [
            f"{layer['index']}{mark}",
            layer["layer_type"].replace("_attention", ""),
            f"{layer['k_amax']:.4g}",
        ]
        row += [f"{layer['k_amax_raw']:.4g}"] if centered else []
        row += [
            f"{layer['k_percentiles']['p99.9']:.4g}",
            f"{layer['v_amax']:.4g}",
            f"{layer['v_percentiles']['p99.9']:.4g}",
            f"{top['head']}:{top['channel']} {top['amax']:.4g}",
        ]
        table.add_row(*row)
    return table
