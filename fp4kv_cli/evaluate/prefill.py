"""Chunked prefill through a :class:`~fp4kv_cli.cache.QuantKVCache`, as a serving engine runs it.

A prompt batch ``[batch, L]`` (left-padded) is written into the cache in chunks of
``rows_per_chunk`` positions (every row advances together). Each chunk is one forward: its tokens
are stored through the quant methods and attend to the stored prefix read back from the cache's
buffers plus their own fresh K/V (see :class:`~fp4kv_cli.cache.QuantKVLayer`), so the FP4/FP8
prefix is what later prompt tokens see, as in an engine's chunked prefill. The activations of one
forward then scale with the chunk (``batch x chunk`` tokens), not the prompt, and peak memory is
the KV cache plus one chunk.

``--prefill-chunk N`` is a token budget per forward over the whole batch, as an engine's
``max_num_batched_tokens``: each row gets ``max(1, N // batch)`` positions per chunk. With bf16
storage the stored prefix is exact and chunked prefill computes what one forward does (up to the
float summation order of the smaller matmuls). Dynamic scales (no scales file) come from the first
chunk's real tokens, as an engine's dynamic KV scales come from the first forward.
"""

from __future__ import annotations

from typing import Any

import torch

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.models import cache_argument

#: Default ``--prefill-chunk``: prompt tokens per prefill forward over the whole batch (vLLM's
#: offline ``max_num_batched_tokens`` on an H100/H200 class GPU).
DEFAULT_PREFILL_CHUNK = 16384


def check_prefill_chunk(tokens: int) -> None:
    """Raise :class:`FP4KVError` unless ``tokens`` is a usable ``--prefill-chunk``."""
    if tokens <= 0:
        raise FP4KVError(f"--prefill-chunk must be > 0 tokens, got {tokens}")


def row_chunk(chunk_tokens: int, batch: int) -> int:
    """Positions each row advances per prefill forward under a ``chunk_tokens`` budget."""
    return max(1, chunk_tokens // max(batch, 1))


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions ``[batch, L]`` of left-padded rows: ``cumsum - 1`` of the mask, 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def chunked_prefill(
    model: Any,
    cache: QuantKVCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    chunk_tokens: int,
    end: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the left-padded prompts ``input_ids [batch, L]`` (positions ``0 .. end-1``, all by
    default) into the fresh ``cache`` in chunks; returns the logits ``[batch, vocab]`` at the
    last written position.

    Parameters
    ----------
    attention_mask:
        ``[batch, L]`` 1 for real tokens; also gives the rotary positions (``cumsum - 1``).
    chunk_tokens:
        Token budget per forward over the batch (:func:`row_chunk` positions per row).
    end:
        Write only the first ``end`` positions (``L - 1`` leaves the last prompt token for
        ``generate`` to feed, which continues from a filled cache).
    positions:
        The rotary positions ``[batch, L]`` of ``attention_mask`` if the caller has them already.
    """
    batch, length = input_ids.shape
    end = length if end is None else end
    if not 0 < end <= length:
        raise ValueError(f"prefill end must be in 1..{length}, got {end}")
    step = row_chunk(chunk_tokens, batch)
    if positions is None:
        positions = mask_positions(attention_mask)
    argument = {cache_argument(model): cache}
    logits = None
    with torch.inference_mode():
        for start in range(0, end, step):
            stop = min(start + step, end)
            if start == 0:  # dynamic scales come from the first chunk's real tokens
                cache.set_token_mask(attention_mask[:, :stop])
            out = model(
                input_ids=input_ids[:, start:stop],
                attention_mask=attention_mask[:, :stop],
                position_ids=positions[:, start:stop],
                use_cache=True,
                logits_to_keep=1,
                **argument,
            )
            logits = out.logits[:, -1]
            del out
    return logits
