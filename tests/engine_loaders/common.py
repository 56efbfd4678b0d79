"""Weight-loading steps SGLang and vLLM share (SGLang's copies are adapted from vLLM's).

Mirrors, line for line in behaviour:

- ``filter_duplicate_safetensors_files`` / ``safetensors_weights_iterator`` and
  ``default_weight_loader``: vllm-project/vllm ``vllm/model_executor/model_loader/weight_utils.py``,
  sgl-project/sglang ``python/sglang/srt/model_loader/weight_utils.py``.
- ``maybe_remap_kv_scale_name``: the same two files (identical logic).
- ``BaseKVCacheMethod.process_weights_after_loading``: sgl-project/sglang
  ``python/sglang/srt/layers/quantization/kv_cache.py`` (vLLM's ``kv_cache.py`` is the same
  apart from skipping everything when ``kv_cache_dtype == "auto"``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

#: Llama / Qwen2 fused parameters: (param_name, shard_name, shard_id).
STACKED_PARAMS_MAPPING = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


def hf_weights_files(model_dir: Path) -> list[Path]:
    """``*.safetensors`` files, filtered to those named in the index when there is one."""
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return files
    weight_map = json.loads(index.read_text())["weight_map"]
    listed = {model_dir / name for name in weight_map.values()}
    return [f for f in files if f in listed]


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every loaded file (engines iterate files, not the index's names)."""
    for path in hf_weights_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in list(handle.keys()):
                yield name, handle.get_tensor(name)


def fused_name(name: str) -> str:
    """A checkpoint weight name as the engine's fused module names it."""
    for param_name, weight_name, _ in STACKED_PARAMS_MAPPING:
        if weight_name in name:
            return name.replace(weight_name, param_name)
    return name


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Scalars broadcast; otherwise the shapes must match."""
    if param.numel() == 1 and loaded_weight.numel() == 1:
        param.fill_(loaded_weight.item())
    else:
        assert param.size() == loaded_weight.size(), (
            f"Attempted to load weight ({loaded_weight.size()}) into parameter ({param.size()})"
        )
        param.copy_(loaded_weight)


def maybe_remap_kv_scale_name(name: str, params_dict: dict[str, torch.Tensor]) -> str | None:
    """Map checkpoint k/v scale names onto ``...self_attn.attn.{k,v}_scale``; ``None`` if absent."""
    if name.endswith(".kv_scale"):
        remapped_name = name.replace(".kv_scale", ".attn.k_scale")
        return remapped_name if remapped_name in params_dict else None
    modelopt_scale_names = [".self_attn.k_proj.k_scale", ".self_attn.v_proj.v_scale"]
    for scale_name in (".k_scale", ".v_scale"):
        if name.endswith(scale_name):
            if any(mo in name for mo in modelopt_scale_names):
                remapped_name = name.replace(
                    f".self_attn.{scale_name[1]}_proj{scale_name}", f".self_attn.attn{scale_name}"
                )
            else:
                remapped_name = name.replace(scale_name, f".attn{scale_name}")
            return remapped_name if remapped_name in params_dict else None
    return name


def process_kv_scales(k_param: torch.Tensor, v_param: torch.Tensor) -> tuple[float, float]:
    """``BaseKVCacheMethod.process_weights_after_loading``: params start at -1.0; both missing
    -> 1.0; one (a remapped ``kv_scale``) -> duplicated; per-tensor only."""
    if k_param.numel() != 1 or v_param.numel() != 1:
        raise ValueError("Only support per-tensor scaling factor for fp8 KV cache")
    k, v = float(k_param), float(v_param)
    if k > 0.0 and v > 0.0:
        return k, v
    if k <= 0.0 and v <= 0.0:
        return 1.0, 1.0
    assert k > 0.0
    both = max(k, v)
    return both, both
