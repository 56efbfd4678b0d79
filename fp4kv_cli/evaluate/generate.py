"""Batched greedy (or seeded sampled) generation through a given KV cache, with lm-eval's stop strings.

Prompts are left-padded into one batch; ``model.generate`` runs greedy decoding and stops a row
at EOS or when a stop string completes (transformers' ``StopStringCriteria``, evaluated on the
device), and the whole batch once every row has stopped. The prefill's attention mask goes to
the cache so padding never enters dynamic scales.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StopStringCriteria

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.evaluate.gsm8k import cut_at_stop
from fp4kv_cli.evaluate.prefill import DEFAULT_PREFILL_CHUNK, chunked_prefill, row_chunk
from fp4kv_cli.evaluate.sampling import ChosenTokenProcessor, RowSampler
from fp4kv_cli.evaluate.static_decode import greedy_static, static_decode_supported
from fp4kv_cli.fused_attention import fused_decode
from fp4kv_cli.gqa_attention import gqa_decode
from fp4kv_cli.models import cache_argument, input_device


@dataclass(frozen=True)
class Continuation:
    """One row's generation: decoded text before the first stop string, the raw decoded text,
    and how many tokens the model generated for it (up to its stop; the closing EOS and the
    padding after it are not counted)."""

    text: str
    raw_text: str
    new_tokens: int


def stop_strings_supported(tokenizer: Any, stop_strings: Sequence[str]) -> bool:
    """Whether transformers' ``StopStringCriteria`` can index this tokenizer's vocabulary (it
    cannot for some unusual tokenizers; generation then stops at EOS or the token budget, and
    the text is cut at the stop strings all the same)."""
    try:
        StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings))
    except ValueError:
        return False
    return True


def greedy_config(
    model: Any, tokenizer: Any, max_new_tokens: int, stop_strings: Sequence[str]
) -> GenerationConfig:
    """Plain greedy decoding: the model's EOS ids, no sampling, penalties or other hub defaults;
    rows stop early at ``stop_strings`` when the tokenizer supports it."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=tokenizer.pad_token_id,
        stop_strings=list(stop_strings) if stop_strings_supported(tokenizer, stop_strings) else None,
    )


def neutral_generation_defaults(model: Any) -> None:
    """Replace the model's hub generation defaults (temperature, repetition penalty ...) with
    transformers' defaults, keeping its special token ids, so ``generate`` is plain greedy."""
    old = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id, pad_token_id=old.pad_token_id
    )


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[batch, longest]`` int64, padded on the left."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, longest - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, longest - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    cache: QuantKVCache,
    config: GenerationConfig,
    stops: Sequence[str],
    decode: str = "graph",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    sampler: RowSampler | None = None,
) -> list[Continuation]:
    """Continuations of ``prompt_ids`` with the KV cache ``cache`` (fresh, one per batch), each
    decoded and cut at ``stops``; see :func:`generate_tokens`."""
    tokens, counts = generate_tokens(
        model, tokenizer, prompt_ids, cache, config, decode, prefill_chunk, sampler
    )
    return continuations(tokenizer, tokens, counts, stops)


def generate_tokens(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    cache: QuantKVCache,
    config: GenerationConfig,
    decode: str = "graph",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    sampler: RowSampler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (or, with ``sampler``, seeded sampled) continuations of ``prompt_ids`` with the KV
    cache ``cache`` (fresh, one per batch): tokens ``[batch, n]`` and how many of each row's
    tokens count (up to its stop: EOS excluded, a completed stop string included).

    ``decode``: ``graph`` — decode steps attend straight from the cache's buffers with the
    decode-attention kernel, static shapes, each step one CUDA graph replay
    (:mod:`fp4kv_cli.evaluate.static_decode`), where supported, else ``fused``; ``fused`` — the
    same kernel in eager steps through ``generate`` where it runs
    (:func:`fp4kv_cli.fused_attention.fused_decode`), else ``gather``; ``gather`` — the prefix is
    read back as dequantized tensors and SDPA runs. Every path draws sampled tokens with the same
    ``sampler`` (inside the graph step, or as a logits processor of ``generate``).

    ``prefill_chunk``: prompt tokens per prefill forward over the batch
    (:mod:`fp4kv_cli.evaluate.prefill`). On the ``generate`` paths a prompt longer than one chunk
    is prefilled but for its last token, which ``generate`` then feeds as its first step.
    """
    device = input_device(model)
    input_ids, attention_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    if decode == "graph" and static_decode_supported(model, cache):
        row_stops = RowStops(input_ids, config.eos_token_id or [], tokenizer, config.stop_strings)
        tokens = greedy_static(
            model,
            cache,
            input_ids,
            attention_mask,
            config.max_new_tokens,
            row_stops.update,
            choose=sampler,
            prefill_chunk=prefill_chunk,
        )
        row_stops.update(tokens)
        return tokens, row_stops.counts(tokens.shape[1])
    fused = decode in ("fused", "graph")
    cache.set_token_mask(attention_mask)
    extra: dict[str, Any] = {"tokenizer": tokenizer} if config.stop_strings else {}
    if sampler is not None:
        extra["logits_processor"] = LogitsProcessorList([ChosenTokenProcessor(sampler, input_ids.shape[1])])
    with torch.inference_mode(), fused_decode(model, cache) if fused else nullcontext() as on, (
        nullcontext() if on else gqa_decode(model)
    ):
        if row_chunk(prefill_chunk, input_ids.shape[0]) < input_ids.shape[1]:
            chunked_prefill(model, cache, input_ids, attention_mask, prefill_chunk, input_ids.shape[1] - 1)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            **extra,
            **{cache_argument(model): cache},
        )
    generated = out[:, input_ids.shape[1] :]
    ends = [t for t in (config.pad_token_id, *(config.eos_token_id or [])) if t is not None]
    return generated, generated.shape[1] - _trailing(generated, ends)


def continuations(
    tokenizer: Any, tokens: torch.Tensor, counts: torch.Tensor, stops: Sequence[str]
) -> list[Continuation]:
    """Each row of ``tokens [batch, n]`` kept to its ``counts`` tokens, decoded and cut at ``stops``."""
    results = []
    for row, count in zip(tokens.tolist(), counts.tolist()):
        raw = tokenizer.decode(row[:count], skip_special_tokens=True)
        results.append(Continuation(cut_at_stop(raw, stops), raw, count))
    return results


class RowStops:
    """Where ``generate`` would have stopped each row of a static decode (which runs every row to
    the end of the batch): at an EOS token (not counted) or when transformers'
    ``StopStringCriteria`` fires on the prompt + tokens so far (the completing token counted).

    Parameters
    ----------
    prompt_ids:
        ``[batch, prompt]`` the left-padded prompts (a stop string may start in the prompt).
    eos_ids:
        The EOS token ids.
    stop_strings:
        Strings ``generate`` stops at, or None (the tokenizer does not support them).
    """

    def __init__(self, prompt_ids: torch.Tensor, eos_ids: Sequence[int], tokenizer: Any,
                 stop_strings: Sequence[str] | None) -> None:  # fmt: skip
        self.eos_ids = torch.tensor(list(eos_ids), dtype=torch.long, device=prompt_ids.device)
        self.criteria = StopStringCriteria(tokenizer, list(stop_strings)) if stop_strings else None
        # The criteria look at the last ``maximum_token_len`` tokens only: keep that much prompt.
        self.tail = self.criteria.maximum_token_len if self.criteria is not None else 0
        self.prompt_tail = prompt_ids[:, prompt_ids.shape[1] - min(self.tail, prompt_ids.shape[1]) :]
        #: Tokens each row keeps (-1: still running), on the device.
        self.ends = torch.full((prompt_ids.shape[0],), -1, dtype=torch.long, device=prompt_ids.device)
        self.checked = 0

    def update(self, tokens: torch.Tensor) -> torch.Tensor:
        """Look at the tokens ``[batch, n]`` not seen yet; returns which rows have stopped."""
        if tokens.shape[1] > self.checked:
            none = tokens.shape[1] + 1  # beyond any end: no stop among the new tokens
            found = torch.minimum(self._eos_ends(tokens, none), self._stop_string_ends(tokens, none))
            self.ends = torch.where((self.ends < 0) & (found < none), found, self.ends)
            self.checked = tokens.shape[1]
        return self.ends >= 0

    def _eos_ends(self, tokens: torch.Tensor, none: int) -> torch.Tensor:
        """Per row, the tokens kept before its first EOS among the new tokens (``none`` if none)."""
        is_eos = torch.isin(tokens[:, self.checked :], self.eos_ids)
        first = is_eos.long().argmax(1)  # the first True, or 0 in a row without one
        return torch.where(is_eos.any(1), self.checked + first, none)

    def _stop_string_ends(self, tokens: torch.Tensor, none: int) -> torch.Tensor:
        """Per row, the tokens kept through the first new token completing a stop string
        (``none`` if none, or without stop strings)."""
        ends = torch.full((tokens.shape[0],), none, dtype=torch.long, device=tokens.device)
        if self.criteria is None:
            return ends
        for count in range(tokens.shape[1], self.checked, -1):  # backwards: the earliest hit stays
            recent = tokens[:, max(0, count - self.tail) : count]
            hit = self.criteria(torch.cat([self.prompt_tail, recent], dim=1), None)
            ends = torch.where(hit, count, ends)
        return ends

    def counts(self, length: int) -> torch.Tensor:
        """Tokens each row keeps, ``length`` for rows that never stopped."""
        return torch.where(self.ends >= 0, self.ends, length)


def _trailing(tokens: torch.Tensor, end_ids: Sequence[int]) -> torch.Tensor:
    """Length of the run of ``end_ids`` (EOS, padding) at the end of each row of ``tokens [batch, n]``."""
    if not end_ids or tokens.shape[1] == 0:
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
    is_end = torch.isin(tokens, torch.tensor(end_ids, device=tokens.device)).long()
    return is_end.flip(1).cumprod(1).sum(1)
