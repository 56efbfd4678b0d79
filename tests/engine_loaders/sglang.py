"""SGLang: which quant config a checkpoint gets, whether attention layers get a KV scale loader,
how scale names are remapped, and what the NVFP4 KV cache does with the loaded scale.

Mirrors (sgl-project/sglang):

- ``python/sglang/srt/configs/model_config.py``: ``_parse_quant_hf_config`` (config.json
  ``quantization_config`` first, else ``hf_quant_config.json`` through
  ``_parse_modelopt_quant_config``, which returns nothing when ``quant_algo`` is null) and
  ``_verify_quantization`` (``--quantization modelopt_fp8/modelopt_fp4`` is compatible with a
  config that says ``modelopt``).
- ``python/sglang/srt/layers/quantization/modelopt_quant.py``: ``ModelOptFp8Config`` /
  ``ModelOptFp4Config`` ``from_config`` (flat and nested) and ``get_quant_method``.
- ``python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py``:
  ``get_quant_method`` returns nothing for ``RadixAttention`` (no KV scale loader).
- ``python/sglang/srt/models/llama.py``: ``LlamaForCausalLM.load_weights``.
- ``python/sglang/srt/layers/quantization/fp4_kv_cache_quant_method.py``:
  ``NVFP4KVCacheMethod.load_scales_from_model`` (x6 when ``is_sm100_supported()``).
- ``python/sglang/srt/model_loader/weight_utils.py``: ``KVCacheQuantSchema`` /
  ``kv_cache_scales_loader`` (``--quantization-param-path``) and ``load_kv_cache_scales`` in
  the model files (one factor per layer for both K and V).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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

E2M1_MAX = 6.0
COMPATIBLE = {"modelopt_fp8": ["modelopt"], "modelopt_fp4": ["modelopt"]}


def _parse_modelopt_quant_config(quant_config_dict: dict[str, Any]) -> dict[str, Any] | None:
    quant_algo = quant_config_dict["quantization"].get("quant_algo", None)
    if quant_algo and ("FP4" in quant_algo or "NVFP4" in quant_algo):
        return {"quant_method": "modelopt_fp4"}
    if quant_algo and "FP8" in quant_algo:
        return {"quant_method": "modelopt_fp8"}
    return None


def resolve_quantization(
    model_dir: Path, quantization: str | None
) -> tuple[str | None, dict[str, Any] | None]:
    """``(quantization method, dict handed to from_config)`` as ModelConfig + get_quant_config do."""
    config = json.loads((model_dir / "config.json").read_text())
    quant_cfg = config.get("quantization_config")
    hf_quant = model_dir / "hf_quant_config.json"
    from_config_dict = quant_cfg
    if quant_cfg is None and hf_quant.is_file():
        nested = json.loads(hf_quant.read_text())
        quant_cfg = _parse_modelopt_quant_config(nested)
        from_config_dict = nested
    if quant_cfg is None:
        return quantization, None
    quant_method = quant_cfg.get("quant_method", "").lower()
    if quantization is None:
        quantization = quant_method
    elif quantization != quant_method and quant_method not in COMPATIBLE.get(quantization, []):
        raise ValueError(f"Quantization method specified in the model config ({quant_method}) does not match")
    return quantization, from_config_dict


@dataclass
class ModelOptFp8Config:
    kv_cache_quant_method: str | None
    exclude_modules: list[str] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelOptFp8Config:
        kv, exclude = None, None
        quant_method = config.get("quant_algo")
        if quant_method is not None:
            scheme = config.get("kv_cache_scheme")
            if scheme and scheme.get("type") == "float" and scheme.get("num_bits") == 8:
                kv = "FP8"
            exclude = config.get("ignore")
        else:
            section = config["quantization"]
            quant_method = section.get("quant_algo")
            kv = section.get("kv_cache_quant_algo")
            exclude = section.get("exclude_modules")
        if quant_method is None or "FP8" not in quant_method:
            raise ValueError("ModelOptFp8Config only supports static FP8 quantization in SGLang.")
        return cls(kv, exclude)

    def quant_method(self, kind: str, prefix: str) -> str | None:
        if self.exclude_modules and any(m in prefix for m in self.exclude_modules):
            return None
        if kind == "linear":
            return "fp8"
        if kind == "attention" and self.kv_cache_quant_method:
            return "kv"
        return None


@dataclass
class ModelOptFp4Config:
    kv_cache_quant_algo: str | None
    exclude_modules: list[str]
    min_capability: int = 100

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelOptFp4Config:
        quant_method = config.get("quant_algo")
        if quant_method is not None:
            kv = config.get("kv_cache_quant_algo")
            if not kv:
                scheme = config.get("kv_cache_scheme")
                kv = (
                    "FP8"
                    if scheme and scheme.get("type") == "float" and scheme.get("num_bits") == 8
                    else "auto"
                )
            group_size = config.get("group_size")
            if group_size is None and config.get("config_groups"):
                group_size = next(iter(config["config_groups"].values())).get("weights", {}).get("group_size")
            exclude = config.get("ignore", [])
        else:
            section = config["quantization"]
            quant_method = section["quant_algo"]
            kv = section.get("kv_cache_quant_algo") or "auto"
            group_size = section.get("group_size")
            exclude = section.get("exclude_modules", [])
        if quant_method not in ("FP8", "NVFP4"):
            raise ValueError("ModelOpt currently only supports: FP8, NVFP4 quantizations in sglang.")
        if group_size is None or exclude is None:
            raise ValueError("NVFP4 quantization requires group_size and exclude_modules")
        return cls(kv, exclude)

    def _excluded(self, prefix: str) -> bool:
        return any(
            re.fullmatch(pattern.replace(".", r"\.").replace("*", r".*"), prefix)
            for pattern in self.exclude_modules
        )

    def quant_method(self, kind: str, prefix: str) -> str | None:
        if kind == "linear":
            return None if self._excluded(prefix) else "nvfp4"
        if kind == "attention" and self.kv_cache_quant_algo:
            return "kv"
        return None


class CompressedTensorsConfig:
    def quant_method(self, kind: str, prefix: str) -> str | None:
        return None  # linear schemes are irrelevant here; RadixAttention gets no KV method


@dataclass(frozen=True)
class SGLangServer:
    """Launch flags that matter: ``--quantization``, ``--kv-cache-dtype`` and the GPU (90/100/120)."""

    kv_cache_dtype: str
    sm: int
    quantization: str | None = None


def quant_config(model_dir: Path, server: SGLangServer) -> Any:
    quantization, config = resolve_quantization(model_dir, server.quantization)
    if config is None:
        return None
    if quantization == "modelopt_fp4":
        cfg = ModelOptFp4Config.from_config(config)
        if server.sm < cfg.min_capability:
            raise ValueError(f"modelopt_fp4 needs capability {cfg.min_capability}, GPU has {server.sm}")
        return cfg
    if quantization in ("modelopt_fp8", "modelopt"):
        return ModelOptFp8Config.from_config(config)
    if quantization in ("compressed-tensors", "compressed_tensors"):
        return CompressedTensorsConfig()
    raise ValueError(f"unhandled quantization {quantization}")


def linear_prefixes(num_layers: int, prefix: str = "model.layers") -> list[str]:
    """SGLang Llama LinearBase prefixes (fused names)."""
    return [
        f"{prefix}.{i}.{module}"
        for i in range(num_layers)
        for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    ]


def load_weights(model_dir: Path, params_dict: dict[str, torch.Tensor]) -> None:
    """``LlamaForCausalLM.load_weights``: remap names with "scale", map q/k/v/gate/up onto the
    fused params (an unknown fused name is a KeyError), load the rest if known."""
    for name, loaded_weight in iterate_weights(model_dir):
        if "scale" in name:
            name = maybe_remap_kv_scale_name(name, params_dict)
            if name is None:
                continue
        for param_name, weight_name, _ in STACKED_PARAMS_MAPPING:
            if weight_name not in name:
                continue
            name = name.replace(weight_name, param_name)
            if name.endswith(".bias") and name not in params_dict:
                continue
            if name not in params_dict:
                raise KeyError(name)  # SGLang indexes params_dict[name] here
            break
        else:
            if name.endswith(".bias") and name not in params_dict:
                continue
            if name.endswith(".kv_scale") and name not in params_dict:
                continue
            if name in params_dict and name.endswith(("k_scale", "v_scale")):
                default_weight_loader(params_dict[name], loaded_weight)


def kv_scales(
    model_dir: Path, server: SGLangServer, num_layers: int, weight_names: list[str]
) -> list[tuple[float, float]]:
    """Per-layer (K, V) values SGLang hands to its KV cache kernels.

    ``weight_names`` are the model's non-KV tensor names (they become the fused params).
    """
    cfg = quant_config(model_dir, server)
    if cfg is not None:
        quantized = [p for p in linear_prefixes(num_layers) if cfg.quant_method("linear", p) is not None]
        if quantized:
            raise ValueError(f"{quantized[0]} would expect quantized weights")
    params: dict[str, torch.Tensor] = {fused_name(n): torch.empty(0) for n in weight_names}
    has_kv = []
    for i in range(num_layers):
        attached = (
            cfg is not None and cfg.quant_method("attention", f"model.layers.{i}.self_attn.attn") == "kv"
        )
        has_kv.append(attached)
        if attached:
            params[f"model.layers.{i}.self_attn.attn.k_scale"] = torch.tensor(-1.0)
            params[f"model.layers.{i}.self_attn.attn.v_scale"] = torch.tensor(-1.0)
    load_weights(model_dir, params)
    scales = []
    for i in range(num_layers):
        if has_kv[i]:
            k, v = process_kv_scales(
                params[f"model.layers.{i}.self_attn.attn.k_scale"],
                params[f"model.layers.{i}.self_attn.attn.v_scale"],
            )
        else:
            k, v = 1.0, 1.0
        if server.kv_cache_dtype == "nvfp4" and server.sm == 100:
            k, v = k * E2M1_MAX, v * E2M1_MAX
        scales.append((k, v))
    return scales


def param_path_scales(
    path: Path, num_layers: int, model_type: str, tp_rank: int = 0, tp_size: int = 1
) -> list[tuple[float, float]]:
    """``--quantization-param-path`` (FP8 only): validate like ``KVCacheQuantSchema`` and
    return the per-layer factor ``load_kv_cache_scales`` sets as both k_scale and v_scale."""
    data = json.loads(path.read_text())
    assert data["model_type"] == model_type, "Model type mismatch"
    kv = data["kv_cache"]
    assert kv["dtype"] == "float8_e4m3fn", "scaling factors intended for another KV cache dtype"
    factors = {
        int(rank): {int(layer): float(s) for layer, s in layers.items()}
        for rank, layers in kv["scaling_factor"].items()
    }
    assert len(factors) == tp_size, "TP size mismatch"
    assert all(len(layers) == num_layers for layers in factors.values()), "layer count mismatch"
    layers = factors[tp_rank]
    return [(layers[i], layers[i]) for i in range(num_layers)]
