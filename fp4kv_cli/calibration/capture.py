"""Capture what a decoder writes into its KV cache: a ``DynamicCache`` whose ``update`` folds each
layer's K (after RoPE) and V into :class:`~fp4kv_cli.calibration.stats.KVStatistics`, and the
left-padded batches it runs on."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from fp4kv_cli.models import cache_argument

#: Called with the layer index and that layer's K and V ``[batch, kv_heads, seq, head_dim]``.
Recorder = Callable[[int, torch.Tensor, torch.Tensor], None]


class RecordingCache(DynamicCache):
    """A ``DynamicCache`` (layer types from the model config) that hands every cache write to a
    recorder before storing it as usual: the recorder sees exactly the tensors the cache holds."""

    def __init__(self, config: Any, recorder: Recorder) -> None:
        super().__init__(config=config)
        self.recorder = recorder

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record ``key_states`` / ``value_states`` of ``layer_idx``, then store them."""
        self.recorder(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass
class Batch:
    """Left-padded token batch on the host.

    ``input_ids`` / ``attention_mask`` / ``position_ids``: int64 ``[batch, seq]``; ``rows``: the
    dataset index of each row.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    rows: list[int]

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch."""
        return int(self.attention_mask.sum())


def tokenize(tokenizer: Any, texts: list[str], seq_len: int) -> list[list[int]]:
    """Token ids of each text, truncated to ``seq_len`` (special tokens as the tokenizer adds them)."""
    encoded = tokenizer(texts, truncation=True, max_length=seq_len, add_special_tokens=True)
    return [list(ids) for ids in encoded["input_ids"]]


def make_batches(sequences: list[list[int]], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Left-padded batches of ``sequences``, longest first (similar lengths share a batch, so
    little padding). Positions count real tokens only, as ``generate`` does: ``cumsum(mask) - 1``."""
    order = sorted((i for i, ids in enumerate(sequences) if ids), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = len(sequences[rows[0]])
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, index in enumerate(rows):
            ids = sequences[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        yield Batch(input_ids, attention_mask, position_ids, rows)


def forward_kwargs(
    model: torch.nn.Module, batch: Batch, device: torch.device, cache: Any | None
) -> dict[str, Any]:
    """Keyword arguments for one plain forward of ``batch``: logits for the last position only,
    the cache under the name this transformers version uses (``use_cache=False`` without one)."""
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids.to(device, non_blocking=True),
        "attention_mask": batch.attention_mask.to(device, non_blocking=True),
        "position_ids": batch.position_ids.to(device, non_blocking=True),
        "use_cache": cache is not None,
    }
    if cache is not None:
        kwargs[cache_argument(model)] = cache
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs


def nonfinite_rows(
    model: torch.nn.Module, batch: Batch, device: torch.device
) -> tuple[int, list[int]] | None:
    """Re-run ``batch`` and find the first layer whose cache write holds NaN/Inf at a real token.

    Returns ``(layer_idx, dataset rows)`` or ``None`` if every value is finite.
    """
    mask = batch.attention_mask.to(device).bool()
    found: dict[int, torch.Tensor] = {}

    def check(layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        bad = (~torch.isfinite(key_states)).any(dim=(1, 3)) | (~torch.isfinite(value_states)).any(dim=(1, 3))
        found[layer_idx] = (bad & mask).any(dim=1)  # [batch]

    with torch.inference_mode():
        model(**forward_kwargs(model, batch, device, RecordingCache(model.config, check)))
    for layer_idx in sorted(found):
        rows = found[layer_idx].nonzero().flatten().tolist()
        if rows:
            return layer_idx, [batch.rows[row] for row in rows]
    return None
