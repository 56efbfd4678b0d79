"""Automatic batch size: as many sequences as free GPU memory holds in a KV format.

On CUDA, with ``F`` bytes free after the model is loaded (``torch.cuda.mem_get_info`` once the
caching allocator has returned its unused blocks), the batch is::

    batch = floor((MEMORY_FRACTION * F - chunk * A) / (C * (kv + gather) + logits))

clamped to ``[1, sequences]``, where

- ``C``: tokens per row the cache holds (longest prompt + new tokens, rounded up to the cache's
  :data:`~fp4kv_cli.cache.CAPACITY_CHUNK`);
- ``kv``: the format's bytes per token over all layers, K, V and block scales included
  (``compute_cell_size`` of each layer's K and V method);
- ``gather``: bytes per token of one layer's K and V dequantized to the model dtype (the prefix a
  prefill chunk, or a gather-read decode step, reads back; one layer at a time), at the KV heads
  and again at the query heads (SDPA with a mask gets K/V repeated to the query heads);
- ``logits``: ``2 * vocab * 4`` bytes per row (the float32 last-position logits and their argmax
  or softmax);
- ``chunk * A``: one prefill forward's activations: ``chunk`` tokens (``--prefill-chunk``) times
  ``A = dtype_bytes * (6 * hidden + 3 * intermediate) + C`` (residual, norms, attention in/out,
  the MLP's gate, up and product per token, plus a bool mask row over the capacity).

The chunked prefill (:mod:`fp4kv_cli.evaluate.prefill`) keeps the activations to one chunk,
so the cache is the only term that grows with the batch. Off CUDA the batch is
:data:`CPU_BATCH_SIZE` (host memory is shared and not worth filling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fp4kv_cli.cache import CAPACITY_CHUNK, QuantKVCache
from fp4kv_cli.errors import FP4KVError

#: Share of the free memory the automatic batch may fill (the rest: allocator slack, kernels' workspaces).
MEMORY_FRACTION = 0.85
#: Batch size off CUDA when ``--batch-size`` is not given.
CPU_BATCH_SIZE = 16


@dataclass(frozen=True)
class BatchPlan:
    """The automatic batch and the figures it came from (all bytes)."""

    batch: int
    free_bytes: int | None
    capacity_tokens: int
    kv_bytes_per_token: int
    row_bytes: int
    reserve_bytes: int


def kv_bytes_per_token(cache: QuantKVCache, kv_heads: int, head_dim: int) -> int:
    """Bytes one token occupies over all layers of ``cache`` (each layer's K and V format)."""
    return sum(
        layer.k_method.compute_cell_size(kv_heads, head_dim, 1, kv_size=1)
        + layer.v_method.compute_cell_size(kv_heads, head_dim, 1, kv_size=1)
        for layer in cache.layers
    )


def free_cuda_bytes(device: torch.device) -> int:
    """Free bytes on ``device`` once the caching allocator has released its unused blocks."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def auto_batch_size(
    text_config: Any,
    cache: QuantKVCache,
    dtype: torch.dtype,
    device: torch.device,
    longest_tokens: int,
    sequences: int,
    prefill_chunk: int,
    free_bytes: Callable[[torch.device], int] = free_cuda_bytes,
) -> BatchPlan:
    """The batch for ``sequences`` rows of up to ``longest_tokens`` (prompt + new) tokens in the
    format of ``cache`` (a fresh one, no buffers yet), by the formula of this module.

    Raises :class:`FP4KVError` when not even one row fits.
    """
    capacity = -(-max(longest_tokens, 1) // CAPACITY_CHUNK) * CAPACITY_CHUNK
    heads = text_config.num_key_value_heads or text_config.num_attention_heads
    head_dim = (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )
    kv = kv_bytes_per_token(cache, heads, head_dim)
    if device.type != "cuda":
        return BatchPlan(min(CPU_BATCH_SIZE, sequences), None, capacity, kv, 0, 0)
    width = torch.empty((), dtype=dtype).element_size()
    gather = 2 * (heads + text_config.num_attention_heads) * head_dim * width
    row = capacity * (kv + gather) + 2 * text_config.vocab_size * 4
    per_token = width * (6 * text_config.hidden_size + 3 * text_config.intermediate_size) + capacity
    reserve = prefill_chunk * per_token
    free = free_bytes(device)
    fits = int((MEMORY_FRACTION * free - reserve) // row)
    if fits < 1:
        raise FP4KVError(
            f"{free / 2**30:.1f} GiB free on {device} hold no sequence of {capacity} tokens "
            f"({row / 2**20:.0f} MiB per row + {reserve / 2**20:.0f} MiB for a {prefill_chunk}-token "
            "prefill chunk); lower --prefill-chunk or --max-new-tokens, or free GPU memory"
        )
    return BatchPlan(min(fits, sequences), free, capacity, kv, row, reserve)
