"""compressed-tensors layout as llm-compressor writes it: ``self_attn.k_scale`` / ``v_scale`` and
``quantization_config.kv_cache_scheme``.

Shapes follow compressed-tensors' ``initialize_module_for_quantization``: strategy ``tensor``
gives ``[1]``, ``attn_head`` gives ``[num_kv_heads, 1, 1]``. vLLM's
``CompressedTensorsKVCacheMethod.validate_kv_cache_scheme`` accepts ``tensor`` and
``attn_head``, symmetric only (vllm-project/vllm
``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from fp4kv_cli.export.names import compressed_tensors_names
from fp4kv_cli.export.plan import LayerPlan


def kv_cache_scheme(per_head: bool) -> dict[str, Any]:
    """FP8 ``kv_cache_scheme``: static, symmetric, per tensor or per attention head."""
    return {
        "num_bits": 8,
        "type": "float",
        "strategy": "attn_head" if per_head else "tensor",
        "dynamic": False,
        "symmetric": True,
        "group_size": None,
        "block_structure": None,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def scale_tensors(plans: Sequence[LayerPlan], prefix: str, per_head: bool) -> dict[str, torch.Tensor]:
    """fp32 K/V scales: ``[1]`` per tensor, ``[num_kv_heads, 1, 1]`` per head."""
    tensors = {}
    for plan in plans:
        k_name, v_name = compressed_tensors_names(prefix, plan.index)
        tensors[k_name] = _tensor(plan.k_scale, plan.k_scale_per_head if per_head else None)
        tensors[v_name] = _tensor(plan.v_scale, plan.v_scale_per_head if per_head else None)
    return tensors


def _tensor(scale: float, heads: tuple[float, ...] | None) -> torch.Tensor:
    if heads is None:
        return torch.tensor([scale], dtype=torch.float32)
    return torch.tensor(heads, dtype=torch.float32).reshape(len(heads), 1, 1)


def quantization_config(existing: dict[str, Any] | None, per_head: bool) -> dict[str, Any]:
    """The existing compressed-tensors config with a new ``kv_cache_scheme``, or a KV-only one
    (no ``config_groups``: every Linear stays unquantized)."""
    config = (
        copy.deepcopy(existing)
        if existing
        else {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "quantization_status": "compressed",
            "config_groups": {},
            "ignore": [],
        }
    )
    config["kv_cache_scheme"] = kv_cache_scheme(per_head)
    return config
