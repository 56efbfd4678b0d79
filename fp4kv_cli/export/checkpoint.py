"""Read the KV scales of an existing Hugging Face checkpoint folder and tell their convention.

Only KV tensors are read (``safetensors.safe_open``), never the weights. The convention comes
from, in order: fp4kv's own ``fp4kv_kv_scales.json``, the ModelOpt producer version in
``hf_quant_config.json`` / ``config.json`` (NVFP4 KV: ``amax / 2688`` before 0.41,
``amax / 448`` from 0.42, NVIDIA/Model-Optimizer PR #790), the compressed-tensors
``kv_cache_scheme`` (FP8: ``amax / 448``), a ``quant_method: fp8`` config with K/V scales (FP8,
``amax / 448``); otherwise it is ambiguous.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from safetensors import SafetensorError, safe_open

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.export.names import KVName, parse_kv_name
from fp4kv_cli.quant.scales import LayerAmax, scale_to_amax

INDEX_NAME = "model.safetensors.index.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
SIDECAR_NAME = "fp4kv_kv_scales.json"
#: First ModelOpt release whose NVFP4 KV scales are amax / 448 (PR #790 merged 2026-01-16).
MODELOPT_448_SINCE = Version("0.42")
#: ModelOpt releases before this one wrote NVFP4 KV scales as amax / 2688 (0.41 is ambiguous).
MODELOPT_2688_BEFORE = Version("0.41")
#: First ModelOpt release that stopped clamping FP8 KV scales to >= 1.0 (CHANGELOG 0.43).
MODELOPT_NO_CLAMP_SINCE = Version("0.43")


@dataclass(frozen=True)
class ConventionReading:
    """The convention of a checkpoint's KV scales as far as its metadata tells."""

    convention: str | None
    kv_dtype: str | None
    basis: str
    producer: str | None = None
    producer_version: str | None = None


@dataclass(frozen=True)
class KVTensor:
    """One KV scale / offset tensor found in a checkpoint (fp32 values, flattened)."""

    key: KVName
    file: str
    indexed: bool
    shape: tuple[int, ...]
    values: tuple[float, ...]


@dataclass
class Checkpoint:
    """What a checkpoint folder says about its KV scales."""

    folder: Path
    config: dict[str, Any]
    hf_quant_config: dict[str, Any] | None
    quantization_config: dict[str, Any] | None
    sidecar: dict[str, Any] | None
    index: dict[str, Any] | None
    weight_files: list[str]
    unindexed_files: list[str]
    missing_files: list[str]
    tensors: list[KVTensor] = field(default_factory=list)
    reading: ConventionReading = ConventionReading(None, None, "no metadata")

    def scales(self, role: str) -> dict[int, KVTensor]:
        """Indexed tensors of one role (``k``, ``v``, ``kv``, ``k_offset``...) by layer."""
        return {t.key.layer: t for t in self.tensors if t.key.role == role and t.indexed}


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a model folder (has ``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, ``None`` if absent; bad JSON is a one-line error."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise FP4KVError(f"{path} is not a JSON text file (binary content); pass a .json file") from None
    except (OSError, json.JSONDecodeError) as err:
        raise FP4KVError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise FP4KVError(f"{path} is not a JSON object; fix or remove it")
    return data


def weight_files(folder: Path) -> tuple[dict[str, Any] | None, list[str], list[str], list[str]]:
    """``(index, indexed files, unindexed *.safetensors, files the index names but lacks)``.

    Without an index every ``*.safetensors`` counts as indexed, as engines load them all.
    """
    present = sorted(p.name for p in folder.glob("*.safetensors"))
    index = read_json(folder / INDEX_NAME)
    if index is None:
        return None, present, [], []
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise FP4KVError(f"{folder / INDEX_NAME} has no weight_map; fix or remove it")
    listed = sorted(set(weight_map.values()))
    return (
        index,
        [f for f in listed if f in present],
        [f for f in present if f not in listed],
        [f for f in listed if f not in present],
    )


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read config, quant configs and every KV tensor of the checkpoint at ``folder``."""
    if not is_checkpoint(folder):
        raise FP4KVError(f"{folder} has no config.json; pass a Hugging Face model folder")
    config = read_json(folder / "config.json") or {}
    index, indexed, unindexed, missing = weight_files(folder)
    ckpt = Checkpoint(
        folder=folder,
        config=config,
        hf_quant_config=read_json(folder / HF_QUANT_CONFIG),
        quantization_config=config.get("quantization_config")
        or (config.get("text_config") or {}).get("quantization_config"),
        sidecar=read_json(folder / SIDECAR_NAME),
        index=index,
        weight_files=indexed,
        unindexed_files=unindexed,
        missing_files=missing,
    )
    for name, is_indexed in [(f, True) for f in indexed] + [(f, False) for f in unindexed]:
        ckpt.tensors.extend(_kv_tensors(folder / name, is_indexed))
    ckpt.reading = detect_convention(ckpt)
    return ckpt


def _kv_tensors(path: Path, indexed: bool) -> list[KVTensor]:
    found = []
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in list(handle.keys()):
                parsed = parse_kv_name(key)
                if parsed is None:
                    continue
                tensor = handle.get_tensor(key).to(torch.float32)
                found.append(
                    KVTensor(
                        parsed, path.name, indexed, tuple(tensor.shape), tuple(tensor.flatten().tolist())
                    )
                )
    except (OSError, SafetensorError) as err:
        raise FP4KVError(f"cannot read {path}: {err}; is it a valid safetensors file?") from None
    return found


def _modelopt_producer(ckpt: Checkpoint) -> tuple[dict[str, Any] | None, str | None]:
    """``(producer, kv_cache_quant_algo)`` from hf_quant_config.json, else config.json."""
    hf = ckpt.hf_quant_config
    if hf is not None:
        return hf.get("producer"), (hf.get("quantization") or {}).get("kv_cache_quant_algo")
    qc = ckpt.quantization_config or {}
    if qc.get("quant_method") == "modelopt":
        algo = qc.get("kv_cache_quant_algo")
        scheme = qc.get("kv_cache_scheme")
        if algo is None and isinstance(scheme, str):
            algo = scheme
        elif algo is None and isinstance(scheme, dict) and scheme.get("num_bits") == 8:
            algo = "FP8"
        return qc.get("producer"), algo
    return None, None


def detect_convention(ckpt: Checkpoint) -> ConventionReading:
    """Work out the KV scale convention of ``ckpt`` from its metadata (see module docstring)."""
    if ckpt.sidecar is not None and ckpt.sidecar.get("convention") in ("448", "6x448"):
        return ConventionReading(
            ckpt.sidecar["convention"],
            ckpt.sidecar.get("kv_dtype"),
            f"{SIDECAR_NAME} written by fp4kv says {ckpt.sidecar['convention']}",
        )
    producer, algo = _modelopt_producer(ckpt)
    if producer is not None or algo is not None:
        return _modelopt_reading(producer or {}, algo)
    qc = ckpt.quantization_config or {}
    scheme = qc.get("kv_cache_scheme")
    if qc.get("quant_method") == "compressed-tensors" and isinstance(scheme, dict):
        if scheme.get("num_bits") == 8 and scheme.get("type") == "float":
            return ConventionReading("448", "fp8", "compressed-tensors kv_cache_scheme is FP8 (amax / 448)")
        return ConventionReading(None, None, f"compressed-tensors kv_cache_scheme {scheme} is not FP8")
    if qc.get("quant_method") == "fp8" and (ckpt.scales("k") or ckpt.scales("v")):
        return ConventionReading(
            "448", "fp8", "quant_method fp8 (transformers' fine-grained FP8): FP8 KV scales, amax / 448"
        )
    if ckpt.scales("kv"):
        return ConventionReading("448", "fp8", "legacy kv_scale tensors are FP8-era (amax / 448)")
    return ConventionReading(None, None, "no quantization metadata names the KV convention")


def _modelopt_reading(producer: dict[str, Any], algo: str | None) -> ConventionReading:
    name = producer.get("name")
    raw_version = producer.get("version")
    kv_dtype = {"FP8": "fp8", "NVFP4": "nvfp4", "NVFP4_AFFINE": "nvfp4"}.get(str(algo).upper())
    base = ConventionReading(None, kv_dtype, "", name, raw_version)
    if kv_dtype == "fp8":
        return _replace(base, "448", f"ModelOpt FP8 KV ({name} {raw_version}): amax / 448")
    if kv_dtype is None:
        return _replace(base, None, f"ModelOpt kv_cache_quant_algo {algo!r} is not FP8/NVFP4")
    try:
        version = Version(str(raw_version))
    except InvalidVersion:
        return _replace(base, None, f"ModelOpt NVFP4 KV but producer version {raw_version!r} is unreadable")
    if version >= MODELOPT_448_SINCE:
        return _replace(base, "448", f"ModelOpt {raw_version} >= 0.42 writes NVFP4 KV scales as amax / 448")
    if version < MODELOPT_2688_BEFORE:
        return _replace(base, "6x448", f"ModelOpt {raw_version} < 0.41 writes NVFP4 KV scales as amax / 2688")
    return _replace(
        base, None, f"ModelOpt {raw_version}: the amax / 448 change (PR #790) landed around 0.41; ambiguous"
    )


def _replace(reading: ConventionReading, convention: str | None, basis: str) -> ConventionReading:
    return ConventionReading(convention, reading.kv_dtype, basis, reading.producer, reading.producer_version)


def fp8_scales_clamped(reading: ConventionReading) -> bool:
    """Whether ModelOpt clamped this checkpoint's FP8 KV scales to >= 1.0 (releases < 0.43)."""
    if reading.kv_dtype != "fp8" or reading.producer != "modelopt" or reading.producer_version is None:
        return False
    try:
        return Version(str(reading.producer_version)) < MODELOPT_NO_CLAMP_SINCE
    except InvalidVersion:
        return False


def checkpoint_amax(ckpt: Checkpoint, convention: str, num_layers: int) -> tuple[LayerAmax, ...]:
    """Per-layer amax implied by the checkpoint's K/V scales read in ``convention``.

    Legacy ``kv_scale`` gives K and V the same amax. Every layer needs both, else an error.
    """
    k, v, kv = ckpt.scales("k"), ckpt.scales("v"), ckpt.scales("kv")
    layers = []
    for index in range(num_layers):
        k_tensor, v_tensor = k.get(index, kv.get(index)), v.get(index, kv.get(index))
        if k_tensor is None or v_tensor is None:
            raise FP4KVError(
                f"{ckpt.folder} has no {'K' if k_tensor is None else 'V'} scale for layer {index}; "
                "it cannot be converted (run fp4kv inspect on it)"
            )
        k_amax = [scale_to_amax(s, convention) for s in k_tensor.values]  # type: ignore[arg-type]
        v_amax = [scale_to_amax(s, convention) for s in v_tensor.values]  # type: ignore[arg-type]
        if min(k_amax + v_amax) <= 0:
            raise FP4KVError(f"{ckpt.folder}: layer {index} has a non-positive KV scale; cannot convert it")
        layers.append(
            LayerAmax(
                index=index,
                k_amax=max(k_amax),
                v_amax=max(v_amax),
                k_amax_per_head=tuple(k_amax) if len(k_amax) > 1 else None,
                v_amax_per_head=tuple(v_amax) if len(v_amax) > 1 else None,
            )
        )
    return tuple(layers)
