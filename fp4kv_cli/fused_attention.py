"""Decode steps that attend straight from a :class:`QuantKVCache`'s buffers (the fused read path).

Inside :func:`fused_decode`, a transformers model that runs SDPA attention switches to the
``fp4kv`` attention implementation: a one-token decode step of a layer whose K/V formats the
Triton kernel reads (:mod:`fp4kv_cli.quant.kernels.decode_attention`) attends over the packed
buffers directly, with no dequantized copy of the prefix; everything else (prefill, multi-token
chunks, other caches, attention modules outside the decoder) runs transformers' SDPA exactly as
before. Models on another attention implementation (eager for softcapping or attention sinks,
flash attention ...) are left alone and keep the gather read. The cache still writes every token through its
quant methods; only the read moves into the attention kernel, as in a serving engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
from fp4kv_cli.models import input_device, placed_devices
from fp4kv_cli.quant.methods import KVCacheMethod

#: The attention implementation name registered with transformers.
ATTENTION_NAME = "fp4kv"


#: The cache whose decode steps are fused, while :func:`fused_decode` is active.
_ACTIVE: ContextVar[QuantKVCache | None] = ContextVar("fp4kv_fused_cache", default=None)


@cache
def decode_kernels() -> ModuleType | None:
    """The decode-attention kernel module, or None where Triton cannot be imported."""
    try:
        from fp4kv_cli.quant.kernels import decode_attention
    except ImportError:
        return None
    return decode_attention


def fused_decode_refusal(model: Any, cache: Any, device: torch.device | None = None) -> str | None:
    """Why :func:`fused_decode` leaves ``model``'s decode steps through ``cache`` on the gather
    read, or None where it switches them to the kernel: it needs a :class:`QuantKVCache`, Triton,
    ``model`` running SDPA attention without logit softcapping, on CUDA (or Triton interpreted).
    ``device`` judges for another device than the model's (e.g. CUDA from a CPU test). Which
    layers the kernel then reads is :func:`fusable`'s call."""
    kernels = decode_kernels()
    implementation = model.config._attn_implementation
    device = device if device is not None else input_device(model)
    if not isinstance(cache, QuantKVCache):
        return f"the cache is a {type(cache).__name__}, not fp4kv's QuantKVCache"
    if kernels is None:
        return "Triton cannot be imported"
    if implementation != "sdpa":
        return f"the model runs {implementation} attention; the kernel stands in for SDPA only"
    if getattr(model.config.get_text_config(decoder=True), "attn_logit_softcapping", None):
        return "the model softcaps attention logits, which the kernel does not"
    placed = placed_devices(model)
    if len(placed) > 1:
        return f"the model is placed on {', '.join(placed)}; the kernel reads a model on one device"
    if device.type != "cuda" and not kernels.INTERPRETED:
        return f"the model is on {device.type}, the kernel runs on CUDA"
    return None


def fused_decode_supported(model: Any, cache: Any) -> bool:
    """Whether :func:`fused_decode` switches ``model``'s decode steps through ``cache`` to the
    kernel (:func:`fused_decode_refusal` finds no reason not to)."""
    return fused_decode_refusal(model, cache) is None


def every_layer_refusal(model: Any, cache: Any, device: torch.device | None = None) -> str | None:
    """Why the kernel will not read every layer of ``cache`` under :func:`fused_decode` (the
    model-level :func:`fused_decode_refusal`, or a layer whose formats, buffer dtypes or head_dim
    it cannot read, foreseen from ``model``'s dtype, device and head_dim and each layer's K and V
    methods), or None where it reads them all."""
    return fused_decode_refusal(model, cache, device) or layer_refusal(model, cache, device)


def layer_refusal(model: Any, cache: Any, device: torch.device | None = None) -> str | None:
    """The first layer of ``cache`` whose formats, buffer dtypes or head_dim the kernel cannot
    read (foreseen from ``model``'s dtype, device and head_dim and each layer's K and V methods),
    or None; the layer half of :func:`every_layer_refusal`, for a caller that has had
    :func:`fused_decode_refusal` find no reason already (``cache`` is then a :class:`QuantKVCache`)."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, device if device is not None else input_device(model)
    for index, layer in enumerate(cache.layers):
        formats = [(method, getattr(method, "dtype", dtype)) for method in (layer.k_method, layer.v_method)]
        if not _reads(formats, dtype, head_dim, device):
            names = "/".join(method.name for method, _ in formats)
            return f"the kernel cannot read layer {index} ({names}, {dtype}, head_dim {head_dim})"
    return None


def fusable(layer: QuantKVLayer) -> bool:
    """Whether the kernel can read this layer's K and V buffers (formats, dtypes, head_dim, device)."""
    formats = ((layer.k_method, layer.buffers.k.dtype), (layer.v_method, layer.buffers.v.dtype))
    return _reads(formats, layer.dtype, layer.head_dim, layer.device)


def decode_read(cache: QuantKVCache) -> str:
    """How the decode steps of the last :func:`fused_decode` block read ``cache``: ``graph`` /
    ``static`` (static-shape steps through the kernel, replayed as CUDA graphs or not),
    ``fused`` (the kernel, every layer), ``gather`` (dequantized copies + SDPA) or
    ``fused N/M layers``."""
    if cache.static_decode is not None:
        return cache.static_decode
    count = sum(layer.kernel_reads > 0 for layer in cache.layers)
    if count == 0:
        return "gather"
    return "fused" if count == len(cache.layers) else f"fused {count}/{len(cache.layers)} layers"


def layer_attention(
    layer: QuantKVLayer, query: torch.Tensor, token_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Attention of ``query [batch, q_heads, 1, head_dim]`` over ``layer``'s filled slots, read
    from its buffers by the kernel, with ``token_mask [batch, length]`` bool (True = attend) or
    None; returns ``[batch, 1, q_heads, head_dim]`` as transformers' attention functions do. A
    layer that stores K rotated is read with the query rotated the same way (rounded to its dtype,
    as engines that rotate Q and K do)."""
    kernels = decode_kernels()
    if layer.rotation is not None:
        query = layer.rotation.apply(query).to(query.dtype)
    b = layer.buffers
    k = kernels.KVSource(layer.k_method.layout, b.k, b.k_scale, layer.k_scale)
    v = kernels.KVSource(layer.v_method.layout, b.v, b.v_scale, layer.v_scale)
    out = kernels.decode_attention(
        query[:, :, 0], k, v, layer.read_length, layer.capacity, token_mask, scaling
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
    """transformers attention function: the kernel for a decode step whose K/V the active cache
    left in its buffers (``kernel_step``), SDPA for everything else."""
    active = _ACTIVE.get()
    index = getattr(module, "layer_idx", None)
    layer = None
    if active is not None and isinstance(index, int) and 0 <= index < len(active.layers):
        layer = active.layers[index]
    if layer is None or not layer.kernel_step or query.shape[2] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer.kernel_step = False  # one read per stored step: a forward that skips update gets SDPA
    layer.kernel_reads += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer_attention(layer, query, _token_mask(attention_mask, layer.read_length), scale), None


@contextmanager
def fused_decode(model: Any, cache: Any) -> Iterator[bool]:
    """Within this block, ``model``'s decode steps through ``cache`` attend with the kernel.

    Layers whose formats, dtypes, head_dim or device the kernel cannot handle keep the gather
    path. Yields whether the fused path is in use: False, with the model untouched, for caches
    other than :class:`QuantKVCache`, models not running SDPA attention, models off CUDA, or
    where Triton is missing.
    """
    if not fused_decode_supported(model, cache):
        yield False
        return
    previous = model.config._attn_implementation
    _register()
    token = _ACTIVE.set(cache)
    cache.set_fused_decode(fusable)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        yield True
    finally:
        model.set_attn_implementation(previous)
        cache.set_fused_decode(None)
        _ACTIVE.reset(token)


def _reads(
    formats: Iterable[tuple[KVCacheMethod, torch.dtype]],
    dtype: torch.dtype,
    head_dim: int,
    device: torch.device,
) -> bool:
    """Whether the kernel reads buffers of these ``(method, buffer dtype)`` for a ``dtype`` query
    of ``head_dim`` on ``device``."""
    kernels = decode_kernels()
    return kernels is not None and all(
        kernels.can_read(method.layout, buffer_dtype, dtype, head_dim, device)
        for method, buffer_dtype in formats
    )


def _token_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """``[batch, length]`` bool (True = attend) of a decode step's 4D mask: a view of a bool
    mask (no copy, so a mask updated in place between CUDA graph replays is read fresh), or the
    kept positions of an additive float one."""
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :length]
    return row if row.dtype == torch.bool else row == 0


@cache
def _register() -> None:
    """Register :func:`fp4kv_attention` (with SDPA's mask) under :data:`ATTENTION_NAME`, once."""
    AttentionInterface.register(ATTENTION_NAME, fp4kv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


__all__ = [
    "ATTENTION_NAME",
    "decode_kernels",
    "decode_read",
    "every_layer_refusal",
    "fp4kv_attention",
    "fusable",
    "fused_decode",
    "fused_decode_refusal",
    "fused_decode_supported",
    "layer_attention",
    "layer_refusal",
]
