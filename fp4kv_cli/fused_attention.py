"""Decode steps that attend straight from a :class:`QuantKVCache`'s buffers (the fused read path).

Inside :func:`fused_decode`, a transformers model runs with the ``fp4kv`` attention
implementation: a one-token decode step of a layer whose K/V formats the Triton kernel reads
(:mod:`fp4kv_cli.quant.kernels.decode_attention`) attends over the packed buffers directly, with
no dequantized copy of the prefix; everything else (prefill, multi-token chunks, other caches)
runs transformers' SDPA exactly as before. The cache still writes every token through its
quant methods; only the read moves into the attention kernel, as in a serving engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from types import ModuleType
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from fp4kv_cli.cache import QuantKVCache, QuantKVLayer

#: The attention implementation name registered with transformers.
ATTENTION_NAME = "fp4kv"
#: The cache whose decode steps are fused, while :func:`fused_decode` is active.
_ACTIVE: ContextVar[QuantKVCache | None] = ContextVar("fp4kv_fused_cache", default=None)


@cache
def _kernels() -> ModuleType | None:
    """The decode-attention kernel module, or None where Triton cannot be imported."""
    try:
        from fp4kv_cli.quant.kernels import decode_attention
    except ImportError:
        return None
    return decode_attention


def fusable(layer: QuantKVLayer) -> bool:
    """Whether the kernel can read this layer's K and V buffers on its device."""
    kernels = _kernels()
    if kernels is None:
        return False
    dim = layer.head_dim
    return (
        (layer.device.type == "cuda" or kernels.INTERPRETED)
        and layer.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and layer.k_method.name in kernels.FORMAT_IDS
        and layer.v_method.name in kernels.FORMAT_IDS
        and 16 <= dim <= 256
        and dim & (dim - 1) == 0
    )


def decode_read(cache: QuantKVCache, fused: bool) -> str:
    """How decode steps read ``cache`` (after it was used): ``fused`` (the kernel, every layer),
    ``gather`` (dequantized copies + SDPA) or ``fused N/M layers``."""
    count = sum(fusable(layer) for layer in cache.layers if layer.is_initialized) if fused else 0
    if count == 0:
        return "gather"
    return "fused" if count == len(cache.layers) else f"fused {count}/{len(cache.layers)} layers"


def layer_attention(
    layer: QuantKVLayer, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention of ``query [batch, q_heads, 1, head_dim]`` over ``layer``'s filled slots, read
    from its buffers by the kernel; returns ``[batch, 1, q_heads, head_dim]`` as transformers'
    attention functions do."""
    kernels = _kernels()
    b = layer.buffers
    k = kernels.KVSource(layer.k_method.name, b.k, b.k_scale, layer.k_scale)
    v = kernels.KVSource(layer.v_method.name, b.v, b.v_scale, layer.v_scale)
    out = kernels.decode_attention(
        query[:, :, 0], k, v, layer.length, layer.capacity, _token_mask(attention_mask, layer.length), scaling
    )
    return out.unsqueeze(1)


def fp4kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: the kernel for a fused decode step of the active cache,
    SDPA for everything else (a fused layer's K/V are then read back from its buffers)."""
    active = _ACTIVE.get()
    layer = None if active is None else active.layers[module.layer_idx]
    if layer is None or not layer.fused_decode or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None and dropout == 0.0:
        return layer_attention(layer, query, attention_mask, scale), None
    key, value = layer.read_all()  # an attention variant the kernel does not implement
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scale, **kwargs
    )


@contextmanager
def fused_decode(model: Any, cache: Any) -> Iterator[bool]:
    """Within this block, ``model``'s decode steps through ``cache`` attend with the kernel.

    Layers whose formats, dtype or device the kernel cannot handle keep the gather path.
    Yields whether the fused path is in use (False, and the model untouched, for caches other
    than :class:`QuantKVCache`, models off CUDA, or where Triton is missing).
    """
    kernels = _kernels()
    device = next(model.parameters()).device
    if not isinstance(cache, QuantKVCache) or kernels is None or not (device.type == "cuda" or kernels.INTERPRETED):
        yield False
        return
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    token = _ACTIVE.set(cache)
    cache.set_fused_decode(fusable)
    try:
        yield True
    finally:
        cache.set_fused_decode(None)
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)


def _token_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """``[batch, length]`` bool (True = attend) of a decode step's 4D mask (bool, or additive float)."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :length]
    keep = row if row.dtype == torch.bool else row == 0
    return keep.contiguous()


@cache
def _register() -> None:
    """Register :func:`fp4kv_attention` (with SDPA's mask) under :data:`ATTENTION_NAME`, once."""
    AttentionInterface.register(ATTENTION_NAME, fp4kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


__all__ = ["ATTENTION_NAME", "decode_read", "fp4kv_attention", "fusable", "fused_decode", "layer_attention"]
