"""``fp4kv inspect``: read the KV scales of a checkpoint, a ``scales.json`` or an fp4kv sidecar,
tell their convention, and list the hazards that make engines silently mis-scale the KV cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.export.checkpoint import (
    Checkpoint,
    KVTensor,
    fp8_scales_clamped,
    is_checkpoint,
    load_checkpoint,
    read_json,
)
from fp4kv_cli.export.conventions import consumers_for
from fp4kv_cli.export.report import SIDECAR_SCHEMA, rotation_serving
from fp4kv_cli.export.source import sidecar_rotation
from fp4kv_cli.quant.scales import (
    CONVENTION_DIVISORS,
    SCALES_SCHEMA,
    amax_to_scale,
    parse_scales,
    scale_to_amax,
)
from fp4kv_cli.serve import centering

#: Implied amax outside this range is not a trained LLM's K/V: post-RoPE K amax is typically
#: 1-1000 (outlier channels a few thousand), V 0.1-100. Beyond it the scale is in the wrong
#: convention or garbage.
PLAUSIBLE_AMAX = (1e-2, 1e4)
READINGS = tuple(CONVENTION_DIVISORS)


def inspect_path(path: Path) -> dict[str, Any]:
    """Report dict for ``path``: a checkpoint folder, a scales.json or an fp4kv sidecar JSON."""
    if path.is_dir():
        if not is_checkpoint(path):
            raise FP4KVError(f"{path} has no config.json; pass a model folder, scales.json or fp4kv sidecar")
        return _inspect_checkpoint(load_checkpoint(path))
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        raise FP4KVError(
            f"{path} is a weights file; pass the model folder that holds it (inspect reads its config.json "
            "and every shard)"
        )
    if path.suffix == ".gguf":
        raise FP4KVError(
            f"{path} is a GGUF file, which carries no KV scales engines read; inspect a Hugging Face model "
            "folder, scales.json or fp4kv sidecar (fp4kv convert makes a folder of a .gguf)"
        )
    data = read_json(path)
    if data is None:
        raise FP4KVError(f"{path} does not exist; pass a model folder, scales.json or fp4kv sidecar")
    if data.get("schema") == SCALES_SCHEMA:
        return _inspect_scales(data, path)
    if data.get("schema") == SIDECAR_SCHEMA:
        return _inspect_sidecar(data, path)
    raise FP4KVError(
        f"{path} is neither an fp4kv scales.json nor an fp4kv sidecar; pass a model folder instead"
    )


def _readings(scale: float | None) -> dict[str, float | None]:
    return {c: None if scale is None else scale_to_amax(scale, c) for c in READINGS}  # type: ignore[arg-type]


def _inspect_scales(data: dict[str, Any], path: Path) -> dict[str, Any]:
    scales = parse_scales(data, source=str(path))
    layers = [
        {
            "index": layer.index,
            "k_amax": layer.k_amax,
            "v_amax": layer.v_amax,
            "k_scale": {c: amax_to_scale(layer.k_amax, c) for c in READINGS},  # type: ignore[arg-type]
            "v_scale": {c: amax_to_scale(layer.v_amax, c) for c in READINGS},  # type: ignore[arg-type]
            "k_offset": layer.k_offset is not None,
        }
        for layer in scales.layers
    ]
    hazards = _implausible([(row["index"], row["k_amax"], row["v_amax"]) for row in layers], "calibrated")
    if any(row["k_offset"] for row in layers):
        hazards.append(
            "k_offset present: k_amax is the amax of K - k_offset; export makes K scales cover raw K"
        )
    rotation = rotation_serving(scales.rotation(), data.get("model", {}).get("head_dim"))
    hazards += _rotation_hazards(rotation)
    return {
        "kind": "scales",
        "path": str(path),
        "convention": None,
        "basis": "a scales.json holds amax, not scales; both conventions shown",
        "layers": layers,
        "qk_rotation": rotation,
        "hazards": hazards,
    }


def _rotation_hazards(rotation: dict[str, Any] | None) -> list[str]:
    if rotation is None:
        return []
    return [
        f"K stored Hadamard-rotated (blocks of {rotation['block']}): the engine must rotate Q and K after "
        f"RoPE ({rotation['sglang']} in SGLang"
        + (f"; ModelOpt {rotation['modelopt']}" if rotation["modelopt"] else "")
        + "); K amax are of rotated K"
    ]


def _inspect_sidecar(data: dict[str, Any], path: Path) -> dict[str, Any]:
    convention = data.get("convention")
    if convention not in READINGS:
        raise FP4KVError(f"{path}: sidecar convention {convention!r} unknown; re-export it with fp4kv")
    layers = []
    for entry in data.get("layers", []):
        k_scale, v_scale = float(entry["k_scale"]), float(entry["v_scale"])
        layers.append(
            {
                "index": entry["index"],
                "k_scale": k_scale,
                "v_scale": v_scale,
                "k_amax": scale_to_amax(k_scale, convention),
                "v_amax": scale_to_amax(v_scale, convention),
                "readings": {"k": _readings(k_scale), "v": _readings(v_scale)},
                "k_amax_centered": entry.get("k_amax_centered"),
            }
        )
    hazards = _implausible([(row["index"], row["k_amax"], row["v_amax"]) for row in layers], convention)
    hazards += _consumer_hazards(data.get("kv_dtype"), convention)
    rotation = data.get("qk_rotation")
    if rotation is not None:
        sidecar_rotation(data)  # malformed entries fail here, in one line
    hazards += _rotation_hazards(rotation)
    return {
        "kind": "sidecar",
        "path": str(path),
        "convention": convention,
        "kv_dtype": data.get("kv_dtype"),
        "qk_rotation": rotation,
        "basis": f"fp4kv sidecar says {convention}",
        "layers": layers,
        "hazards": hazards,
    }


def _inspect_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    reading = ckpt.reading
    cfg = ckpt.config.get("text_config") or ckpt.config
    num_layers = int(cfg.get("num_hidden_layers", 0))
    k, v, kv = ckpt.scales("k"), ckpt.scales("v"), ckpt.scales("kv")
    centered = _centered_amax(ckpt)
    layers = []
    for index in range(num_layers):
        k_t, v_t = k.get(index, kv.get(index)), v.get(index, kv.get(index))
        k_scale, v_scale = _max(k_t), _max(v_t)
        layers.append(
            {
                "index": index,
                "k_tensor": None if k_t is None else k_t.key.name,
                "v_tensor": None if v_t is None else v_t.key.name,
                "k_family": None if k_t is None else k_t.key.family,
                "k_scale": k_scale,
                "v_scale": v_scale,
                "k_scale_per_head": None if k_t is None or len(k_t.values) == 1 else list(k_t.values),
                "v_scale_per_head": None if v_t is None or len(v_t.values) == 1 else list(v_t.values),
                "readings": {"k": _readings(k_scale), "v": _readings(v_scale)},
                "k_amax": None
                if k_scale is None or reading.convention is None
                else scale_to_amax(k_scale, reading.convention),  # type: ignore[arg-type]
                "v_amax": None
                if v_scale is None or reading.convention is None
                else scale_to_amax(v_scale, reading.convention),  # type: ignore[arg-type]
                "k_amax_centered": centered.get(str(index)),
            }
        )
    return {
        "kind": "checkpoint",
        "path": str(ckpt.folder),
        "convention": reading.convention,
        "kv_dtype": reading.kv_dtype,
        "basis": reading.basis,
        "producer": reading.producer,
        "producer_version": reading.producer_version,
        "layers": layers,
        "other_tensors": [
            {"name": t.key.name, "role": t.key.role, "file": t.file, "indexed": t.indexed}
            for t in ckpt.tensors
            if t.key.role not in ("k", "v", "kv") or not t.indexed
        ],
        "k_centering": _k_centering(ckpt),
        "qk_rotation": None if ckpt.sidecar is None else ckpt.sidecar.get("qk_rotation"),
        "hazards": _checkpoint_hazards(ckpt, layers)
        + _rotation_hazards(None if ckpt.sidecar is None else ckpt.sidecar.get("qk_rotation")),
    }


def _k_centering(ckpt: Checkpoint) -> dict[str, Any] | None:
    """How the checkpoint asks engines to center K, and who serves it: fp4kv's marker + offsets
    (the fp4kv vLLM plugin), ModelOpt's affine ``k_proj.k_bias`` (no engine), or offsets alone
    (K scales cover raw K; nothing to serve)."""
    roles = {t.key.role for t in ckpt.tensors}
    entry = centering.read_marker(ckpt.folder)
    if entry is not None:
        return {"naming": "fp4kv", "marker": entry, "served_by": "fp4kv vLLM plugin", "needs_plugin": True,
                "k_scales_cover": "centered K", "overflow_without": _overflow(ckpt)}  # fmt: skip
    if "k_bias" in roles:
        return {"naming": "modelopt affine (k_proj.k_bias)", "served_by": None, "needs_plugin": False,
                "k_scales_cover": "centered K", "overflow_without": _overflow(ckpt)}  # fmt: skip
    if "k_offset" in roles:
        return {"naming": "fp4kv (no marker)", "served_by": None, "needs_plugin": False,
                "k_scales_cover": "raw K", "overflow_without": None}  # fmt: skip
    return None


def _overflow(ckpt: Checkpoint) -> dict[str, float] | None:
    """Largest raw-K amax / centered-K amax over layers, from fp4kv's sidecar (None without it)."""
    rows = [
        (layer["index"], layer["k_amax_raw"] / layer["k_amax_centered"])
        for layer in (ckpt.sidecar or {}).get("layers", [])
        if layer.get("k_amax_raw") and layer.get("k_amax_centered")
    ]
    if not rows:
        return None
    index, ratio = max(rows, key=lambda row: row[1])
    return {"layer": index, "ratio": ratio}


def _max(tensor: KVTensor | None) -> float | None:
    return None if tensor is None else max(tensor.values)


def _centered_amax(ckpt: Checkpoint) -> dict[str, float]:
    if ckpt.sidecar is not None:
        return {
            str(layer["index"]): layer["k_amax_centered"]
            for layer in ckpt.sidecar.get("layers", [])
            if layer.get("k_amax_centered") is not None
        }
    return {}


def _declares_kv(ckpt: Checkpoint) -> bool:
    hf = (ckpt.hf_quant_config or {}).get("quantization") or {}
    qc = ckpt.quantization_config or {}
    return bool(hf.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme") or qc.get("kv_cache_quant_algo"))


def _loads_kv(ckpt: Checkpoint) -> bool:
    """Whether engines load KV scales of this checkpoint: it declares KV quantization, or it is
    ``quant_method: fp8``, whose ``Fp8Config`` attaches a KV scale loader to every attention."""
    return _declares_kv(ckpt) or (ckpt.quantization_config or {}).get("quant_method") == "fp8"


def _modelopt_without_algo(ckpt: Checkpoint) -> bool:
    """ModelOpt metadata only in hf_quant_config.json, with no weight algorithm (engines skip it)."""
    hf = (ckpt.hf_quant_config or {}).get("quantization") or {}
    return ckpt.hf_quant_config is not None and ckpt.quantization_config is None and not hf.get("quant_algo")


def _checkpoint_hazards(ckpt: Checkpoint, layers: list[dict[str, Any]]) -> list[str]:
    hazards = []
    have = [row for row in layers if row["k_scale"] is not None or row["v_scale"] is not None]
    if not have:
        what = "declares KV quantization but has no KV scales" if _declares_kv(ckpt) else "has no KV scales"
        hazards.append(f"{what}: SGLang, vLLM and TRT-LLM silently use scale 1.0 (implied amax 448)")
    elif not _loads_kv(ckpt):
        hazards.append(
            "KV scale tensors but no KV quantization config (kv_cache_quant_algo / kv_cache_scheme): "
            "SGLang attaches no KV scale loader and uses 1.0; vLLM refuses to load the checkpoint"
        )
    elif _modelopt_without_algo(ckpt):
        hazards.append(
            "hf_quant_config.json has quant_algo null (a ModelOpt KV-only export): SGLang and vLLM read no "
            "quant config from it, so SGLang uses 1.0 and vLLM refuses to load the KV scale tensors; "
            "re-export it with fp4kv export-scales --format modelopt"
        )
    for row in have:
        for side in ("k", "v"):
            if row[f"{side}_scale"] is None:
                hazards.append(f"layer {row['index']} has no {side.upper()} scale: engines use 1.0 for it")
    scales = [row[f"{s}_scale"] for row in have for s in ("k", "v") if row[f"{s}_scale"] is not None]
    if scales and all(s == 1.0 for s in scales):
        hazards.append("every KV scale is 1.0: uncalibrated (or ModelOpt's >= 1.0 clamp); implied amax 448")
    elif fp8_scales_clamped(ckpt.reading) and any(s == 1.0 for s in scales):
        hazards.append(
            f"ModelOpt {ckpt.reading.producer_version} < 0.43 clamps FP8 KV scales to >= 1.0: scales of 1.0 "
            "hide a smaller amax (range wasted)"
        )
    readings = (ckpt.reading.convention,) if ckpt.reading.convention else READINGS
    for convention in readings:
        rows = [
            (row["index"], row["readings"]["k"][convention], row["readings"]["v"][convention]) for row in have
        ]
        hazards += _implausible(rows, convention)
    if ckpt.reading.kv_dtype in (None, "nvfp4") and have:
        hazards += _consumer_hazards("nvfp4" if ckpt.reading.kv_dtype else None, ckpt.reading.convention)
    if any(row["k_scale_per_head"] for row in have) and any(row["k_family"] == "modelopt" for row in have):
        hazards.append(
            "per-head k_proj.k_scale: SGLang's and vLLM's BaseKVCacheMethod accept per-tensor scales only "
            "(vLLM refuses to load it)"
        )
    hazards += _centering_hazards(_k_centering(ckpt))
    hazards += _extra_tensor_hazards(ckpt)
    if ckpt.missing_files:
        hazards.append(f"index lists missing shard(s) {', '.join(ckpt.missing_files)}: engines fail to load")
    return hazards


def _centering_hazards(info: dict[str, Any] | None) -> list[str]:
    if info is None or info["k_scales_cover"] != "centered K":
        return []
    over = info["overflow_without"]
    how = (
        "raw K exceeds the K scale's range by up to the offset (no fp4kv sidecar says how far)"
        if over is None
        else f"raw K reaches x{over['ratio']:.3g} the K scale's range (layer {over['layer']}) and is clipped"
    )
    if info["needs_plugin"]:
        return [
            (
                "needs the fp4kv vLLM plugin (pip install fp4kv): it stores K - k_offset; K scales cover "
                f"centered K, so an engine without the plugin (SGLang, TRT-LLM, vLLM without fp4kv) OVERFLOWS: {how}"
            )
        ]
    return [
        (
            "ModelOpt affine K bias (k_proj.k_bias): no engine reads it today (vLLM, SGLang, TRT-LLM store raw "
            f"K); K scales cover centered K, so every engine OVERFLOWS: {how}"
        )
    ]


def _extra_tensor_hazards(ckpt: Checkpoint) -> list[str]:
    hazards = []
    info = _k_centering(ckpt)
    centered = info is not None and info["k_scales_cover"] == "centered K"
    for tensor in ckpt.tensors:
        role, name = tensor.key.role, tensor.key.name
        if role in ("k_offset", "k_bias", "v_bias"):
            if role in ("k_offset", "k_bias") and centered and not tensor.indexed:
                continue  # what serves it (or not) is said in the centering hazard
            if tensor.indexed:
                hazards.append(
                    f"{name} is indexed: vLLM maps k_proj.* onto qkv_proj and fails to load it (SGLang skips it)"
                )
            else:
                hazards.append(
                    f"{name} ({tensor.file}, not indexed): engines ignore it and quantize raw K with the "
                    "plain K scale"
                )
        elif not tensor.indexed:
            hazards.append(f"{name} is in {tensor.file}, which the index does not list: engines ignore it")
    return hazards


def _implausible(rows: list[tuple[int, float | None, float | None]], reading: str) -> list[str]:
    low, high = PLAUSIBLE_AMAX
    bad = [
        (index, side, amax)
        for index, k_amax, v_amax in rows
        for side, amax in (("K", k_amax), ("V", v_amax))
        if amax is not None and not low <= amax <= high
    ]
    if not bad:
        return []
    index, side, amax = bad[0]
    return [
        (
            f"{len(bad)} implausible amax read as {reading} (e.g. layer {index} {side} {amax:.4g}, "
            f"outside {low:g}..{high:g}): wrong convention or bad calibration"
        )
    ]


def _consumer_hazards(kv_dtype: str | None, convention: str | None) -> list[str]:
    """What the verified NVFP4 consumers do with scales in ``convention`` (both readings if unknown)."""
    if kv_dtype not in (None, "nvfp4"):
        return []
    hazards = []
    for reading in (convention,) if convention else READINGS:
        for consumer in consumers_for("nvfp4"):
            if consumer.expects == reading:
                continue
            ratio = CONVENTION_DIVISORS[consumer.expects] / CONVENTION_DIVISORS[reading]  # type: ignore[index]
            prefix = "" if convention else f"if {reading}: "
            if ratio < 1:
                hazards.append(
                    f"{prefix}{consumer.name} {consumer.how}: implied amax = amax / {1 / ratio:g}, "
                    "NVFP4 block scales OVERFLOW"
                )
            else:
                hazards.append(
                    f"{prefix}{consumer.name} {consumer.how}: implied amax = {ratio:g} x amax, "
                    "E4M3 block-scale range wasted"
                )
    return hazards


def inspect_table(report: dict[str, Any]) -> Table:
    """Rich table of an inspect report: stored scales and the amax each reading implies."""
    detected = report.get("convention")
    title = f"{report['kind']} {report['path']}: convention {detected or 'AMBIGUOUS'} ({report['basis']})"
    table = Table(title=title)
    table.add_column("layer", justify="right")
    if report["kind"] == "scales":
        for column in ("K amax", "V amax"):
            table.add_column(column, justify="right")
        for c in READINGS:
            table.add_column(f"K scale\n{c}", justify="right")
            table.add_column(f"V scale\n{c}", justify="right")
        for row in report["layers"]:
            cells = [str(row["index"]), f"{row['k_amax']:.5g}", f"{row['v_amax']:.5g}"]
            for c in READINGS:
                cells += [f"{row['k_scale'][c]:.6g}", f"{row['v_scale'][c]:.6g}"]
            table.add_row(*cells)
        return table
    for column in ("K scale", "V scale"):
        table.add_column(column, justify="right")
    for c in READINGS:
        mark = " *" if c == detected else ""
        table.add_column(f"K amax\nif {c}{mark}", justify="right")
        table.add_column(f"V amax\nif {c}{mark}", justify="right")
    for row in report["layers"]:
        cells = [str(row["index"]), _fmt(row["k_scale"], ".6g"), _fmt(row["v_scale"], ".6g")]
        for c in READINGS:
            cells += [_fmt(row["readings"]["k"][c], ".5g"), _fmt(row["readings"]["v"][c], ".5g")]
        table.add_row(*cells)
    return table


def _fmt(value: float | None, spec: str) -> str:
    return "[red]missing[/]" if value is None else format(value, spec)


def write_inspect_json(report: dict[str, Any], path: Path) -> None:
    """Save an inspect report as JSON (atomically)."""
    try:
        write_json_atomic(path, report)
    except OSError as err:
        raise FP4KVError(f"cannot write {path}: {err.strerror}; choose a writable --json path") from None
