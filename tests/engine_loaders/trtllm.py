"""TensorRT-LLM (PyTorch flow): hf_quant_config.json parsing and the KV scales of the fused QKV.

Mirrors (NVIDIA/TensorRT-LLM):

- ``tensorrt_llm/_torch/model_config.py``: ``ModelConfig.load_modelopt_quant_config`` reads
  ``quantization.quant_algo`` / ``kv_cache_quant_algo`` / ``group_size`` / ``exclude_modules``
  (``quant_algo`` may be null).
- ``tensorrt_llm/_torch/modules/linear.py``: ``FP8QDQLinearMethod.load_kv_scales`` takes
  ``k_scale`` / ``v_scale`` from the k_proj / v_proj weight dicts of the fused QKV, and
  ``process_weights_after_loading_fused_qkv_linear`` sets ``kv_scales = [1, max(k), max(v)]``
  (current; ``TRTLLM_LOAD_KV_SCALES`` defaults to "1"). The older ``load_weights_fused_qkv_linear``
  multiplied by 6 and only ran with ``TRTLLM_LOAD_KV_SCALES=1`` (``legacy=True`` here).

ASSUMED, not read: excluded modules match by fnmatch and then use an unquantized linear method
that does not load KV scales (``kv_scales`` keep their initial 1.0).
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from .common import iterate_weights

E2M1_MAX = 6.0


def load_modelopt_quant_config(model_dir: Path) -> dict[str, Any]:
    section = json.loads((model_dir / "hf_quant_config.json").read_text())["quantization"]
    return {
        "quant_algo": section.get("quant_algo", None),
        "kv_cache_quant_algo": section.get("kv_cache_quant_algo", None),
        "group_size": section.get("group_size", None),
        "exclude_modules": section.get("exclude_modules", None),
    }


def kv_scales(model_dir: Path, num_layers: int, legacy: bool = False) -> list[tuple[float, float]]:
    """Per-layer (K, V) ``kv_scales`` the attention op gets."""
    quant = load_modelopt_quant_config(model_dir)
    weights = dict(iterate_weights(model_dir))
    scales = []
    for i in range(num_layers):
        module = f"model.layers.{i}.self_attn.qkv_proj"
        excluded = any(fnmatch(module, pattern) for pattern in quant["exclude_modules"] or [])
        fp8_qkv = quant["quant_algo"] == "FP8" and not excluded
        k_dict = {
            n.rsplit(".", 1)[1]: t
            for n, t in weights.items()
            if n.startswith(f"model.layers.{i}.self_attn.k_proj.")
        }
        v_dict = {
            n.rsplit(".", 1)[1]: t
            for n, t in weights.items()
            if n.startswith(f"model.layers.{i}.self_attn.v_proj.")
        }
        if not fp8_qkv or "k_scale" not in k_dict:
            scales.append((1.0, 1.0))
            continue
        k, v = float(k_dict["k_scale"].reshape([])), float(v_dict["v_scale"].reshape([]))
        scales.append((k * E2M1_MAX, v * E2M1_MAX) if legacy else (k, v))
    return scales
