"""``fp4kv export-scales``: write KV scales in the layout and convention an engine loads.

Folder formats (``modelopt``, ``compressed-tensors``, ``fp8``) produce a full model folder: the
original files hard-linked, plus a new shard ``model-fp4kv-kv-scales.safetensors`` listed in
``model.safetensors.index.json`` (created when the model was a single file), a rewritten
``config.json`` (and ``hf_quant_config.json`` for ModelOpt) and the report
``fp4kv_kv_scales.json``. Shards that already held KV scales are rewritten without them, since
engines load every tensor of every indexed shard. ``json`` writes only the sidecar file.

``fp8`` merges FP8 KV scales into a transformers fine-grained FP8 checkpoint
(``quantization_config.quant_method: fp8``): its config stays as it is, and per-tensor
``self_attn.k_scale`` / ``v_scale`` join the weights, which vLLM's and SGLang's ``Fp8Config``
load through their ``Fp8KVCacheMethod`` (vllm-project/vllm
``vllm/model_executor/layers/quantization/fp8.py``; sgl-project/sglang
``python/sglang/srt/layers/quantization/fp8.py``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.export import compressed_tensors, modelopt
from fp4kv_cli.export.checkpoint import (
    HF_QUANT_CONFIG,
    INDEX_NAME,
    SIDECAR_NAME,
    Checkpoint,
    is_checkpoint,
    load_checkpoint,
    read_json,
)
from fp4kv_cli.export.conventions import FORMATS, Resolution, check_choice, resolve
from fp4kv_cli.export.names import k_bias_name, k_offset_name, layer_prefix
from fp4kv_cli.export.plan import LayerPlan, consumer_view, plan_layers
from fp4kv_cli.export.report import build_report, consumer_problems
from fp4kv_cli.export.source import KVSource, load_source
from fp4kv_cli.export.writer import FileWriter, WrittenFile, copy_shard_without, write_file, write_folder
from fp4kv_cli.quant.backend import read_layout
from fp4kv_cli.serve import centering
from fp4kv_cli.validate import check_output_path

SCALES_SHARD = "model-fp4kv-kv-scales.safetensors"
#: Not listed in the index on purpose: SGLang and vLLM Llama/Qwen2 loaders map any
#: ``k_proj.*`` tensor onto ``qkv_proj`` and fail on names they do not know.
OFFSET_FILE = centering.OFFSET_FILE
ST_METADATA = {"format": "pt"}
#: ``--k-centering``: how an export asks engines to store ``K - k_offset``. ``none``: it does not
#: (K scales cover raw K; the offsets ride along unindexed); ``plugin``: fp4kv's offsets + the
#: config.json marker the fp4kv vLLM plugin serves; ``modelopt``: ModelOpt's affine-KV naming
#: (``k_proj.k_bias``), which no engine reads today. Both of the latter export K scales of
#: centered K.
K_CENTERING = ("none", "plugin", "modelopt")
#: ``--k-centering modelopt``'s ``k_proj.k_bias`` tensors, also kept out of the index: indexed,
#: vLLM 0.32 fails to load the checkpoint (its Qwen2/Llama loader maps k_proj.* onto qkv_proj).
K_BIAS_FILE = "fp4kv-k-bias-modelopt.safetensors"
#: Formats whose engines load one K and one V scale per layer (per-head amax are reduced).
PER_TENSOR_FORMATS = ("modelopt", "fp8")


@dataclass(frozen=True)
class ExportRequest:
    """Everything ``fp4kv export-scales`` was asked to do."""

    scales: Path
    out: Path
    kv_dtype: str
    fmt: str
    model_dir: Path | None = None
    convention: str | None = None
    engine: str | None = None
    target: str | None = None
    overwrite: bool = False
    force_convention: bool = False
    source_convention: str | None = None
    per_head: bool = True
    k_centering: str = "none"


@dataclass(frozen=True)
class ExportResult:
    """The report (also written to disk), where it went, and the files of the export."""

    report: dict[str, Any]
    report_path: Path
    files: list[WrittenFile]


#: What serving a KV dtype that writes another one's layout (:func:`read_layout`) takes.
WRITER_NOTES = {
    "nvfp4_4over6": (
        "nvfp4_4over6 is a store-time rule on the nvfp4 layout: the checkpoint is nvfp4's; serve it with "
        "vLLM --kv-cache-dtype nvfp4_4over6 (vLLM's SM100 trtllm-gen path; its FA2 path on "
        "sm80/sm90/sm120 takes only nvfp4); SGLang and TensorRT-LLM have no 4-over-6 writer and store max->6"
    ),
}


def export_scales(request: ExportRequest) -> ExportResult:
    """Validate, plan and write one export; raises :class:`FP4KVError` on bad input.

    Choices (``--kv-dtype``, ``--format``, ``--engine``, ``--target``, conventions) are
    case-insensitive; the output's folder must take new files before anything is read.
    """
    request = _normalized(request)
    check_choice(request.fmt, FORMATS, "--format")
    check_output_path(request.out, "--out", folder=request.fmt != "json")
    note = WRITER_NOTES.get(request.kv_dtype)
    request = replace(request, kv_dtype=read_layout(request.kv_dtype))
    if request.fmt == "fp8" and request.kv_dtype != "fp8":
        raise FP4KVError(
            "--format fp8 carries FP8 KV scales (the engines' Fp8KVCacheMethod); for NVFP4 KV merge into a "
            "ModelOpt checkpoint with --format modelopt"
        )
    resolution = resolve(
        request.kv_dtype, request.convention, request.engine, request.target, request.force_convention
    )
    if request.fmt == "compressed-tensors" and request.kv_dtype == "nvfp4":
        raise FP4KVError(
            "no engine fp4kv verified loads NVFP4 KV scales from compressed-tensors; use --format modelopt"
        )
    check_choice(request.k_centering, K_CENTERING, "--k-centering")
    _check_centering_format(request)
    model_dir = _model_dir(request)
    config = read_json(model_dir / "config.json") or {}
    source = load_source(request.scales, config, request.source_convention)
    centered = request.k_centering != "none"
    if centered and any(raw is None for raw in source.k_amax_raw):
        raise FP4KVError(
            f"--k-centering {request.k_centering} needs a scales file with k_offset on every layer; "
            "calibrate with fp4kv calibrate --center-k"
        )
    per_head = request.per_head and request.fmt not in PER_TENSOR_FORMATS and _has_per_head(source)
    plans = plan_layers(source, resolution.convention, per_head, centered)
    warnings = list(resolution.warnings) + _source_warnings(
        source, request.fmt, per_head, request.k_centering
    )
    if note is not None:
        warnings.append(note)
    model_type = str((config.get("text_config") or config).get("model_type", "unknown"))
    if request.fmt == "json":
        return _export_json(request, model_dir, source, plans, resolution, per_head, model_type, warnings)
    return _export_folder(
        request, model_dir, config, source, plans, resolution, per_head, model_type, warnings
    )


def _normalized(request: ExportRequest) -> ExportRequest:
    """``request`` with its choice options stripped and lower-cased."""

    def norm(value: str | None) -> str | None:
        return None if value is None else value.strip().lower()

    return replace(
        request,
        kv_dtype=norm(request.kv_dtype),
        fmt=norm(request.fmt),
        convention=norm(request.convention),
        engine=norm(request.engine),
        target=norm(request.target),
        source_convention=norm(request.source_convention),
        k_centering=norm(request.k_centering) or "none",
    )


def _check_centering_format(request: ExportRequest) -> None:
    if request.k_centering == "none":
        return
    if request.fmt == "json":
        raise FP4KVError(
            f"--k-centering {request.k_centering} writes into a model folder; use --format "
            "compressed-tensors or modelopt"
        )
    if request.k_centering == "modelopt" and request.fmt != "modelopt":
        raise FP4KVError(
            "--k-centering modelopt is ModelOpt's affine-KV naming; use it with --format modelopt "
            "(or --k-centering plugin)"
        )


def _model_dir(request: ExportRequest) -> Path:
    model_dir = request.model_dir
    if model_dir is None:
        if not request.scales.is_dir():
            raise FP4KVError(
                "--model-dir is required with a scales.json; pass the model folder it was calibrated on"
            )
        model_dir = request.scales
    if not is_checkpoint(model_dir):
        raise FP4KVError(f"--model-dir {model_dir} has no config.json; pass a Hugging Face model folder")
    return model_dir


def _has_per_head(source: KVSource) -> bool:
    return all(layer.k_amax_per_head and layer.v_amax_per_head for layer in source.layers)


def _source_warnings(source: KVSource, fmt: str, per_head: bool, k_centering: str) -> list[str]:
    warnings = []
    if _has_per_head(source) and not per_head:
        why = f"{fmt} stores one scale per layer" if fmt in PER_TENSOR_FORMATS else "--per-tensor"
        warnings.append(f"per-head amax reduced to the per-tensor max ({why})")
    if source.rotation is not None:
        warnings.append(
            f"K amax are of Hadamard-rotated K (blocks of {source.rotation.block}): serve with an engine that "
            f"rotates Q and K after RoPE (SGLang --qkrot-block {source.rotation.block}); one that does not "
            "gets K scales sized for rotated K (see qk_rotation)"
        )
    if k_centering != "none":
        warnings.append(centering_hazard(source_overflow(source), k_centering))
    elif any(raw is not None for raw in source.k_amax_raw):
        where = "in the sidecar" if fmt == "json" else f"to {OFFSET_FILE} (not indexed: engines ignore it)"
        warnings.append(
            f"k_offset exported {where}; the K scale covers raw K (k_amax_raw), so engines that "
            "ignore the offset do not clip but get plain scales"
        )
    return warnings


def source_overflow(source: KVSource) -> tuple[int, float]:
    """(layer, ratio) of the largest raw-K amax / centered-K amax of a centered scales source."""
    ratios = [
        (layer.index, raw / layer.k_amax)
        for layer, raw in zip(source.layers, source.k_amax_raw)
        if raw is not None
    ]
    return max(ratios, key=lambda item: item[1])


def centering_hazard(worst: tuple[int, float], k_centering: str) -> str:
    """What an engine that does not center K gets from K scales of centered K."""
    layer, ratio = worst
    reader = (
        "served centered only by vLLM with the fp4kv plugin (pip install fp4kv)"
        if k_centering == "plugin"
        else "ModelOpt's k_proj.k_bias, which no engine reads today"
    )
    return (
        f"K scales cover centered K ({reader}); an engine that stores raw K with them OVERFLOWS: "
        f"raw K reaches x{ratio:.3g} the scale's range (layer {layer}) and is clipped"
    )


def _report(
    source: KVSource,
    plans: tuple[LayerPlan, ...],
    resolution: Resolution,
    fmt: str,
    kv_dtype: str,
    per_head: bool,
    model_type: str,
    warnings: list[str],
    qkv_quantized: bool,
) -> dict[str, Any]:
    views = [consumer_view(c, fmt, qkv_quantized, per_head, model_type) for c in resolution.consumers]
    report = build_report(
        source=source,
        plans=plans,
        resolution=resolution,
        views=views,
        kv_dtype=kv_dtype,
        fmt=fmt,
        per_head=per_head,
        model_type=model_type,
        warnings=warnings,
    )
    report["warnings"] += consumer_problems(report)
    return report


def _export_json(
    request: ExportRequest,
    model_dir: Path,
    source: KVSource,
    plans: tuple[LayerPlan, ...],
    resolution: Resolution,
    per_head: bool,
    model_type: str,
    warnings: list[str],
) -> ExportResult:
    report = _report(
        source, plans, resolution, "json", request.kv_dtype, per_head, model_type, warnings, False
    )
    sources = {model_dir, request.scales} if request.scales.is_dir() else {model_dir}
    write_file(request.out, _json_writer(report), sources, request.overwrite)
    return ExportResult(report, request.out, [WrittenFile(request.out.name, "new")])


def _export_folder(
    request: ExportRequest,
    model_dir: Path,
    config: dict[str, Any],
    source: KVSource,
    plans: tuple[LayerPlan, ...],
    resolution: Resolution,
    per_head: bool,
    model_type: str,
    warnings: list[str],
) -> ExportResult:
    ckpt = load_checkpoint(model_dir)
    family = _quant_family(ckpt)
    if request.fmt == "fp8" and family != "fp8":
        raise FP4KVError(
            f"--format fp8 merges into a transformers fine-grained FP8 checkpoint (quant_method fp8); {model_dir} "
            f"is {family or 'not quantized'}: export --format {family if family in FORMATS else 'modelopt'} instead"
        )
    if family is not None and family != request.fmt:
        raise FP4KVError(
            f"{model_dir} is already {family}-quantized; export --format "
            f"{family if family in FORMATS else 'json'} instead"
        )
    if ckpt.missing_files:
        raise FP4KVError(
            f"{model_dir} index lists missing shard {ckpt.missing_files[0]}; fix the model folder"
        )
    shards = _shard_tensors(ckpt)
    names = [name for shard_names in shards.values() for name in shard_names]
    prefix = layer_prefix(names)
    new_files: dict[str, FileWriter] = {}
    stale = {t.key.name for t in ckpt.tensors if t.indexed}
    skip = {t.file for t in ckpt.tensors if not t.indexed} | {SIDECAR_NAME}
    for shard in sorted({t.file for t in ckpt.tensors if t.indexed}):
        if shard == SCALES_SHARD or set(shards[shard]) <= stale:
            skip.add(shard)
            continue
        new_files[shard] = _shard_copier(model_dir / shard, stale)
        warnings.append(f"{shard} held old KV scales: rewritten without them")
    if request.fmt == "modelopt":
        tensors = modelopt.scale_tensors(plans, prefix)
        hf_config = modelopt.hf_quant_config(ckpt.hf_quant_config, request.kv_dtype, resolution.convention)
        existing = _modelopt_quantization_config(ckpt)
        # A ModelOpt checkpoint with only hf_quant_config.json keeps it that way: engines read
        # the nested form, which (unlike SGLang's flat modelopt_fp8 parser) carries NVFP4 KV.
        quant_config = (
            None
            if ckpt.hf_quant_config is not None and existing is None
            else modelopt.quantization_config(hf_config, existing)
        )
        new_files[HF_QUANT_CONFIG] = _json_writer(hf_config)
        qkv_quantized = modelopt.qkv_quantized(hf_config)
        if (
            qkv_quantized
            and existing is not None
            and hf_config["quantization"]["quant_algo"] == "FP8"
            and (request.kv_dtype == "nvfp4")
        ):
            warnings.append(
                "FP8 weights + NVFP4 KV in config.json: SGLang's flat modelopt_fp8 parser cannot read an "
                "NVFP4 kv_cache_scheme; remove quantization_config from config.json to use hf_quant_config.json"
            )
    elif request.fmt == "fp8":  # the checkpoint's own quantization_config loads the scales as it is
        tensors = compressed_tensors.scale_tensors(plans, prefix, per_head=False)
        quant_config = None
        qkv_quantized = False
    else:
        tensors = compressed_tensors.scale_tensors(plans, prefix, per_head)
        quant_config = compressed_tensors.quantization_config(ckpt.quantization_config, per_head)
        qkv_quantized = False
    new_files[SCALES_SHARD] = _tensor_writer(tensors, ST_METADATA)
    if request.k_centering == "modelopt":
        new_files[K_BIAS_FILE] = _tensor_writer(_k_bias_tensors(plans, prefix), ST_METADATA)
    if request.k_centering != "modelopt" and any(plan.k_offset is not None for plan in plans):
        new_files[OFFSET_FILE] = _offset_writer(plans, prefix)
    new_files[INDEX_NAME] = _index_writer(ckpt, names, stale, tensors)
    new_config = dict(config)
    if quant_config is not None:
        new_config["quantization_config"] = quant_config
    new_config.pop(centering.MARKER, None)
    if request.k_centering == "plugin":
        first = plans[0].k_offset
        new_config[centering.MARKER] = centering.marker(len(plans), len(first), len(first[0]))
    if new_config != config:
        new_files["config.json"] = _json_writer(new_config)
    report = _report(
        source,
        plans,
        resolution,
        request.fmt,
        request.kv_dtype,
        per_head,
        model_type,
        warnings,
        qkv_quantized,
    )
    report["k_centering"] = request.k_centering
    new_files[SIDECAR_NAME] = _json_writer(report)
    files = write_folder(model_dir, request.out, new_files, skip, request.overwrite)
    return ExportResult(report, request.out / SIDECAR_NAME, files)


def _quant_family(ckpt: Checkpoint) -> str | None:
    qc = ckpt.quantization_config
    if ckpt.hf_quant_config is not None:
        return "modelopt"
    if qc is None:
        return None
    return str(qc.get("quant_method", "unknown"))


def _modelopt_quantization_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    qc = ckpt.quantization_config
    return qc if qc is not None and qc.get("quant_method") == "modelopt" else None


def _shard_tensors(ckpt: Checkpoint) -> dict[str, list[str]]:
    """Tensor names per indexed shard (from the index, else from the files' headers)."""
    shards: dict[str, list[str]] = {}
    if ckpt.index is not None:
        for name, shard in ckpt.index["weight_map"].items():
            shards.setdefault(shard, []).append(name)
        return shards
    for shard in ckpt.weight_files:
        with safe_open(str(ckpt.folder / shard), framework="pt") as handle:
            shards[shard] = list(handle.keys())
    if not shards:
        raise FP4KVError(
            f"{ckpt.folder} has no *.safetensors weights; export needs a safetensors model folder"
        )
    return shards


def _json_writer(data: dict[str, Any]) -> FileWriter:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2) + "\n")

    return write


def _tensor_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> FileWriter:
    def write(path: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)

    return write


def _shard_copier(src: Path, drop: set[str]) -> FileWriter:
    def write(path: Path) -> None:
        copy_shard_without(src, path, drop)

    return write


def _offset_writer(plans: tuple[LayerPlan, ...], prefix: str) -> FileWriter:
    tensors = {
        k_offset_name(prefix, plan.index): torch.tensor(plan.k_offset, dtype=torch.float32)
        for plan in plans
        if plan.k_offset is not None
    }
    centered = {str(p.index): p.k_amax_centered for p in plans if p.k_amax_centered is not None}
    return _tensor_writer(tensors, {**ST_METADATA, "fp4kv_k_amax_centered": json.dumps(centered)})


def _k_bias_tensors(plans: tuple[LayerPlan, ...], prefix: str) -> dict[str, torch.Tensor]:
    """ModelOpt affine-KV biases: ``k_proj.k_bias`` ``[1, kv_heads, 1, head_dim]`` (the
    keepdim mean over batch and sequence of HF's ``[batch, heads, seq, head_dim]`` key states;
    ModelOpt stores ``K - k_bias``), float32."""
    return {
        k_bias_name(prefix, plan.index): torch.tensor(plan.k_offset, dtype=torch.float32)[None, :, None, :]
        for plan in plans
        if plan.k_offset is not None
    }


def _index_writer(
    ckpt: Checkpoint, names: list[str], stale: set[str], tensors: dict[str, torch.Tensor]
) -> FileWriter:
    if ckpt.index is not None:
        weight_map = {k: v for k, v in ckpt.index["weight_map"].items() if k not in stale}
        metadata = dict(ckpt.index.get("metadata") or {})
    else:
        if len(ckpt.weight_files) != 1:
            raise FP4KVError(f"{ckpt.folder} has several shards but no {INDEX_NAME}; fix the model folder")
        weight_map = {name: ckpt.weight_files[0] for name in names if name not in stale}
        metadata = {}
    weight_map.update({name: SCALES_SHARD for name in tensors})

    def write(path: Path) -> None:
        folder = path.parent
        metadata["total_size"] = sum(
            _data_bytes(folder / shard) for shard in sorted(set(weight_map.values()))
        )
        path.write_text(
            json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )

    return write


def _data_bytes(path: Path) -> int:
    """Size of a safetensors file's data buffer, read from its header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return max((info["data_offsets"][1] for info in header.values()), default=0)
