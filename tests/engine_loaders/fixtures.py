"""Tiny model folders and synthetic scales dicts for the export / inspect tests."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from fp4kv_cli.quant.scales import config_hash

K_AMAX = (12.5, 30.25, 7.0)
V_AMAX = (2.5, 4.75, 1.5)


def save_llama(folder: Path) -> Path:
    """Tiny random Llama (2 layers, 4 q / 2 KV heads, head_dim 16) in one safetensors file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def save_qwen2_sharded(folder: Path) -> Path:
    """Tiny random Qwen2 (3 layers, 2 KV heads, head_dim 16, k_proj bias) in several shards."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder, max_shard_size="60KB")
    return folder


def model_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def scales_dict(
    folder: Path,
    *,
    per_head: bool = False,
    offset: bool = False,
    k_amax: tuple[float, ...] = K_AMAX,
    v_amax: tuple[float, ...] = V_AMAX,
) -> dict[str, Any]:
    """A valid ``fp4kv.scales`` v1 dict for the model in ``folder``."""
    config = model_config(folder)
    layers = config["num_hidden_layers"]
    heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    entries = []
    for i in range(layers):
        entry: dict[str, Any] = {"index": i, "k_amax": k_amax[i], "v_amax": v_amax[i]}
        if per_head:
            entry["k_amax_per_head"] = [k_amax[i]] + [k_amax[i] / (h + 2) for h in range(heads - 1)]
            entry["v_amax_per_head"] = [v_amax[i] / (h + 2) for h in range(heads - 1)] + [v_amax[i]]
        if offset:
            entry["k_offset"] = [[0.25 * (h + 1) * (-1) ** d for d in range(head_dim)] for h in range(heads)]
            entry["k_amax_raw"] = k_amax[i] + 0.25 * heads
        entries.append(entry)
    return {
        "schema": "fp4kv.scales",
        "version": 1,
        "model": {
            "id": str(folder),
            "config_hash": config_hash(config),
            "model_type": config["model_type"],
            "num_layers": layers,
            "num_kv_heads": heads,
            "head_dim": head_dim,
        },
        "layers": entries,
    }


def write_scales(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def close(a: float, b: float, rel: float = 2.0**-7) -> bool:
    """Equal within one bfloat16 step (export rounds scales up to bfloat16 values)."""
    return math.isclose(a, b, rel_tol=rel)
