"""Gather-read decode steps on CPU without transformers' ``repeat_kv`` copies.

With a padding mask, transformers' SDPA attention copies K and V once per query head group
(``repeat_kv``) before every call, so a decode step of a GQA model copies the whole cached prefix
``q_heads / kv_heads`` times per layer: on CPU that copy costs more than the attention itself.
PyTorch's CPU SDPA reads grouped K/V natively (``enable_gqa=True``) and, for a one-token query,
gives the same bits as the repeated copy (the same per-head arithmetic on the same values;
``tests/test_gqa_attention.py`` checks the generated tokens and logits). Inside
:func:`gqa_decode`, a model running SDPA attention on CPU switches to that for one-token
queries; every other call (prefill, chunks, other devices) runs transformers' SDPA unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: The attention implementation name registered with transformers.
ATTENTION_NAME = "fp4kv_gqa"


def gqa_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA with native grouped K/V for a one-token CPU query
    (no ``repeat_kv`` copy), transformers' SDPA for everything else."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        groups == 1
        or query.shape[2] != 1
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions", False)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def gqa_decode(model: Any) -> Iterator[bool]:
    """Within this block, ``model``'s one-token decode steps on CPU attend with
    :func:`gqa_sdpa_attention`. Yields whether it is in use: False, with the model untouched, for
    models not running SDPA attention (eager, flash attention ...) or not on CPU."""
    device = getattr(model, "device", None)
    if model.config._attn_implementation != "sdpa" or device is None or torch.device(device).type != "cpu":
        yield False
        return
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield True
    finally:
        model.set_attn_implementation("sdpa")


@cache
def _register() -> None:
    """Register :func:`gqa_sdpa_attention` (with SDPA's mask) under :data:`ATTENTION_NAME`, once."""
    AttentionInterface.register(ATTENTION_NAME, gqa_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


__all__ = ["ATTENTION_NAME", "gqa_decode", "gqa_sdpa_attention"]
