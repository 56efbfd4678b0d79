"""Teacher-forced logits of scored tokens that read a prefix stored in the quantized KV cache.

A batch of ``(prefix, scored)`` token lists: the prefixes (left-padded) are prefilled into the
cache in one forward, then the scored tokens (right-padded) are fed in chunks of
:data:`~fp4kv_cli.evaluate.fidelity.ANSWER_CHUNK`, as the fidelity step feeds an answer: every
chunk attends to everything before it read back from the cache buffers, plus its own fresh K/V,
as a prefill kernel reading a paged FP4 cache would. The logits at every scored token are
returned. Scoring a continuation ``c`` after a context ``x``, the prefix is ``x[:-1]`` and the
scored tokens ``x[-1:] + c[:-1]``: the logit of every continuation token, the first included,
then reads the whole context from the stored (quantized) cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.evaluate.fidelity import ANSWER_CHUNK
from fp4kv_cli.evaluate.generate import left_pad
from fp4kv_cli.models import cache_argument, input_device


def scored_logits(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    cache: QuantKVCache,
    pad_id: int,
    chunk: int = ANSWER_CHUNK,
) -> list[torch.Tensor]:
    """Per pair, the logits ``[len(scored), vocab]`` (model dtype) at each scored token, the
    prefix read from ``cache`` (fresh, with room for the longest prefix + scored tokens).

    Rows are independent: a row's padding is masked out of every other position's attention
    and its rotary positions count only its own tokens."""
    if not pairs or any(not scored for _, scored in pairs):
        raise ValueError("scored_logits needs at least one pair, each with at least one scored token")
    device = input_device(model)
    argument = {cache_argument(model): cache}
    prefix_ids, mask = left_pad([list(prefix) for prefix, _ in pairs], pad_id, device)
    lengths = mask.sum(-1, keepdim=True)
    width = max(len(scored) for _, scored in pairs)
    tokens = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    for row, (_, scored) in enumerate(pairs):
        tokens[row, : len(scored)] = torch.tensor(list(scored), dtype=torch.long)
    tokens = tokens.to(device)
    pieces = []
    with torch.inference_mode():
        if prefix_ids.shape[1]:
            cache.set_token_mask(mask)  # dynamic scales from the real prefix tokens only
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            model(input_ids=prefix_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                  use_cache=True, **argument)  # fmt: skip
        else:
            real = torch.tensor(
                [[i < len(s) for i in range(min(chunk, width))] for _, s in pairs], device=device
            )
            cache.set_token_mask(real.long())
        for start in range(0, width, chunk):
            ids = tokens[:, start : start + chunk]
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)  # right padding: finite, never attended
            positions = lengths + torch.arange(start, start + ids.shape[1], device=device)
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **argument
            )
            pieces.append(out.logits)
    logits = torch.cat(pieces, dim=1)
    return [logits[row, : len(scored)] for row, (_, scored) in enumerate(pairs)]
