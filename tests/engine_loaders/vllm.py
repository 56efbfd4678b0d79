"""vLLM: quant config selection, KV scale loader attachment, name mapping and scale processing.

Mirrors (vllm-project/vllm):

- ``vllm/model_executor/layers/quantization/modelopt.py``: ``ModelOptQuantConfigBase.from_config``
  (nested ``quantization`` or flat; ``quant_algo`` must be in ``QUANT_ALGOS``, null is an error),
  ``is_layer_excluded`` (exact, substring, fnmatch) and ``get_quant_method`` (attention first).
- ``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``:
  ``get_quant_method`` (every Attention gets ``CompressedTensorsKVCacheMethod``),
  ``validate_kv_cache_scheme`` (``tensor`` / ``attn_head``, symmetric; note its
  ``type_ != "float" and num_bits != 8`` test) and ``get_cache_scale`` (``.output_scale``).
- ``vllm/model_executor/models/llama.py``: ``LlamaModel.load_weights`` (``get_cache_scale``,
  then ``maybe_remap_kv_scale_name`` for names with "scale", then the stacked mapping; any
  unknown name is a KeyError).
- ``vllm/model_executor/layers/quantization/kv_cache.py``: ``BaseKVCacheMethod``
  (``kv_cache_dtype == "auto"`` ignores the scales).

ASSUMED, not read: how vLLM shapes the attention ``k_scale`` parameter for ``attn_head``; the
mirror gives it the checkpoint's ``[num_kv_heads, 1, 1]`` shape and keeps per-head values.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from .common import (
    STACKED_PARAMS_MAPPING,
    default_weight_loader,
    fused_name,
    iterate_weights,
    maybe_remap_kv_scale_name,
    process_kv_scales,
)

QUANT_ALGOS = ["FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4"]


class ModelOptConfig:
    def __init__(self, config: dict[str, Any]) -> None:
        if "quantization" in config:
            section = config["quantization"]
            quant_method = section.get("quant_algo")
            self.kv_cache_quant_method = section.get("kv_cache_quant_algo")
            self.exclude_modules = section.get("exclude_modules", [])
        else:
            quant_method = config.get("quant_algo")
            self.kv_cache_quant_method = config.get("kv_cache_quant_algo")
            self.exclude_modules = config.get("ignore", [])
        if not quant_method:
            raise ValueError("Missing 'quant_algo' in quantization config")
        if str(quant_method).upper() not in QUANT_ALGOS:
            raise ValueError(f"ModelOpt currently only supports: {QUANT_ALGOS}")

    def _excluded(self, prefix: str) -> bool:
        return any(
            (m != prefix and m in prefix) or m == prefix or fnmatch(prefix, m) for m in self.exclude_modules
        )

    def quant_method(self, kind: str, prefix: str) -> str | None:
        if kind == "attention":
            return "kv"
        if self._excluded(prefix):
            return None
        return "quantized" if kind == "linear" else None

    def cache_scale(self, name: str) -> str | None:
        return None


class CompressedTensorsConfig:
    def __init__(self, config: dict[str, Any]) -> None:
        self.kv_cache_scheme = config.get("kv_cache_scheme")
        self.config_groups = config.get("config_groups") or {}

    def validate_kv_cache_scheme(self) -> None:
        scheme = self.kv_cache_scheme
        if scheme is None:
            return
        if scheme.get("type") != "float" and scheme.get("num_bits") != 8:
            raise NotImplementedError("Currently supported kv cache quantization is num_bits=8, type=float")
        if scheme.get("strategy") not in ("tensor", "attn_head"):
            raise NotImplementedError("Invalid strategy for compressed-tensors KV cache.")
        if not scheme.get("symmetric"):
            raise NotImplementedError(
                "Only support symmetric scaling factor for compressed-tensors KV cache."
            )

    def quant_method(self, kind: str, prefix: str) -> str | None:
        if kind == "attention":
            self.validate_kv_cache_scheme()
            return "kv"
        return "quantized" if kind == "linear" and self.config_groups else None

    def cache_scale(self, name: str) -> str | None:
        if name.endswith(".output_scale") and ".k_proj" in name:
            return name.replace(".k_proj.output_scale", ".attn.k_scale")
        if name.endswith(".output_scale") and ".v_proj" in name:
            return name.replace(".v_proj.output_scale", ".attn.v_scale")
        return None


def quant_config(model_dir: Path, quantization: str | None = None) -> Any:
    """``get_quant_config``: config.json ``quantization_config`` first; ``hf_quant_config.json``
    only with ``--quantization modelopt`` and a ``modelopt`` producer."""
    config = json.loads((model_dir / "config.json").read_text())
    qc = config.get("quantization_config")
    if qc is None:
        hf_quant = model_dir / "hf_quant_config.json"
        if quantization != "modelopt" or not hf_quant.is_file():
            return None
        qc = json.loads(hf_quant.read_text())
        if qc["producer"]["name"] != "modelopt":
            raise ValueError("Unsupported quantization config found for modelopt")
        return ModelOptConfig(qc)
    if qc.get("quant_method") == "modelopt":
        return ModelOptConfig(qc)
    if qc.get("quant_method") == "compressed-tensors":
        return CompressedTensorsConfig(qc)
    raise ValueError(f"unhandled quant_method {qc.get('quant_method')}")


def kv_scales(
    model_dir: Path,
    num_layers: int,
    weight_names: list[str],
    kv_cache_dtype: str = "fp8",
    quantization: str | None = None,
) -> list[tuple[list[float], list[float]]]:
    """Per-layer (K, V) scale values vLLM attention uses (lists: one value, or one per head)."""
    cfg = quant_config(model_dir, quantization)
    if cfg is not None:
        linear = [f"model.layers.{i}.self_attn.qkv_proj" for i in range(num_layers)]
        if any(cfg.quant_method("linear", p) for p in linear):
            raise ValueError("QKV would expect quantized weights")
    params: dict[str, torch.Tensor] = {fused_name(n): torch.empty(0) for n in weight_names}
    attached = cfg is not None
    if attached:
        cfg.quant_method("attention", "model.layers.0.self_attn.attn")
        per_head = (
            isinstance(cfg, CompressedTensorsConfig)
            and (cfg.kv_cache_scheme or {}).get("strategy") == "attn_head"
        )
        for i in range(num_layers):
            for side in ("k", "v"):
                shape = _per_head_shape(model_dir, i, side) if per_head else ()
                params[f"model.layers.{i}.self_attn.attn.{side}_scale"] = torch.full(shape, -1.0)
    for name, loaded_weight in iterate_weights(model_dir):
        if cfg is not None and (scale_name := cfg.cache_scale(name)):
            loaded = loaded_weight if loaded_weight.dim() == 0 else loaded_weight[0]
            default_weight_loader(params[scale_name], loaded)
            continue
        if "scale" in name or "zero_point" in name:
            name = maybe_remap_kv_scale_name(name, params)
            if name is None:
                continue
        for _, weight_name, _ in STACKED_PARAMS_MAPPING:
            if weight_name in name:
                name = fused_name(name)
                break
        if name.endswith(".bias") and name not in params:
            continue
        if name not in params:
            raise KeyError(name)  # vLLM indexes params_dict[name] here
        if name.endswith(("k_scale", "v_scale")):
            default_weight_loader(params[name], loaded_weight)
    if not attached or kv_cache_dtype == "auto":
        return [([1.0], [1.0])] * num_layers
    result = []
    for i in range(num_layers):
        k, v = (
            params[f"model.layers.{i}.self_attn.attn.k_scale"],
            params[f"model.layers.{i}.self_attn.attn.v_scale"],
        )
        if k.numel() == 1:
            k_s, v_s = process_kv_scales(k, v)
            result.append(([k_s], [v_s]))
        else:
            result.append((k.flatten().tolist(), v.flatten().tolist()))
    return result


def _per_head_shape(model_dir: Path, layer: int, side: str) -> tuple[int, ...]:
    """The checkpoint tensor's shape (the ASSUMED per-head parameter shape)."""
    for name, tensor in iterate_weights(model_dir):
        if name.endswith(f"layers.{layer}.self_attn.{side}_scale"):
            return tuple(tensor.shape)
    return ()
