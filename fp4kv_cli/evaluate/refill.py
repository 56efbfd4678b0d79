"""Continuous batching in the static-shape decode: a finished row's slot takes the next waiting prompt.

:func:`~fp4kv_cli.evaluate.static_decode.greedy_static` runs one batch until its longest row
stops, so every row that stopped earlier is computed, to no use, until then. Here a pool of
prompts runs through ``batch`` slots of one :class:`~fp4kv_cli.cache.QuantKVCache`: every
:data:`~fp4kv_cli.evaluate.static_decode.CHECK_EVERY` steps (sooner when a row reaches the token
budget) the host looks for slots whose row has stopped (EOS, a stop string, the token budget), hands their tokens out, and prefills the
next waiting prompts into those slots, while the other slots keep their state and go on decoding.

Each slot has its own write position, rotary position, output column and mask row (device
tensors the step advances), so the step keeps the shapes of a fixed batch and is captured once
as a CUDA graph; a refill runs between replays, outside the graph, and changes those tensors in
place. A refill prefills its prompts (left-padded among themselves) in a fresh cache of the same
storage and copies the stored bytes into the slots' rows; with static scales (calibrated, or
formats without a tensor scale) those bytes are the ones a batch prefill would store, so a
question's tokens are those of the batch path up to float rounding (the kernel's sum over the
capacity in other splits, a prefill over other padding; with a prompt longer than one
``--prefill-chunk`` share the chunk boundaries follow the refill group, as they follow the
batch on the batch path). Dynamic scales come from a batch's prefill, so they are refused
(:func:`refill_refusal`). A slot whose row reaches the budget freezes (its counters stop) until
the next check; once no prompt waits, a finished slot idles (frozen) while the others finish.

Sampled rows draw with their own ``(seed, question, sample)`` key and their own step count
(:mod:`fp4kv_cli.evaluate.sampling`), so a refilled row samples the tokens it would in any batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StopStringCriteria

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.evaluate import static_decode
from fp4kv_cli.evaluate.generate import Continuation, continuations, left_pad
from fp4kv_cli.evaluate.prefill import DEFAULT_PREFILL_CHUNK, chunked_prefill, row_chunk
from fp4kv_cli.evaluate.sampling import RowSampler, sample_next
from fp4kv_cli.fused_attention import fusable, fused_decode
from fp4kv_cli.models import cache_argument, input_device

#: A refill prefills at most ``batch / REFILL_SHARE`` rows at a time (more in several prefills), so
#: its fresh cache and the prefill's read buffers stay a small share of the slots' cache.
REFILL_SHARE = 8


def refill_refusal(model: Any, cache: Any, device: torch.device | None = None) -> str | None:
    """Why :func:`refill_static` cannot run ``model`` with caches like ``cache``, or None where it
    can: the static-shape step must run (:func:`~fp4kv_cli.evaluate.static_decode.static_decode_refusal`)
    and no layer may take dynamic scales (they come from one batch's prefill)."""
    refusal = static_decode.static_decode_refusal(model, cache, device)
    if refusal is not None:
        return refusal
    if any(layer.dynamic_k or layer.dynamic_v for layer in cache.layers):
        return "dynamic KV scales come from each batch's prefill (pass --scales for calibrated ones)"
    return None


class SlotStops:
    """Where ``generate`` would stop the row in each slot (as :class:`~fp4kv_cli.evaluate.generate.RowStops`
    does for a fixed batch): at an EOS token (not counted) or once transformers'
    ``StopStringCriteria`` fires on the prompt + tokens so far (the completing token counted).

    It owns the slots' token history ``[slots, tail + budget + 1]``: the last ``tail`` prompt
    tokens (left-padded with ``pad_id``), then the generated tokens, then a scratch column a
    frozen row writes to; the decode step writes there."""

    def __init__(self, slots: int, budget: int, eos_ids: Sequence[int], tokenizer: Any,
                 stop_strings: Sequence[str] | None, pad_id: int, device: torch.device) -> None:  # fmt: skip
        self.criteria = StopStringCriteria(tokenizer, list(stop_strings)) if stop_strings else None
        self.tail = self.criteria.maximum_token_len if self.criteria is not None else 0
        self.pad_id = pad_id
        self.eos_ids = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
        self.history = torch.full((slots, self.tail + budget + 1), pad_id, dtype=torch.long, device=device)
        #: Tokens each slot's row keeps (-1: still running) and tokens looked at so far.
        self.ends = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.checked = torch.zeros(slots, dtype=torch.long, device=device)

    def start(self, rows: torch.Tensor, prompts: Sequence[Sequence[int]], first: torch.Tensor) -> None:
        """Slots ``rows [k]`` begin the rows of ``prompts`` whose first generated token is ``first [k]``."""
        tails = torch.full((len(prompts), self.tail), self.pad_id, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            kept = list(prompt)[len(prompt) - min(self.tail, len(prompt)) :]
            if kept:
                tails[i, self.tail - len(kept) :] = torch.tensor(kept, dtype=torch.long)
        self.history[rows, : self.tail] = tails.to(self.history.device)
        self.history[rows, self.tail] = first
        self.ends[rows] = -1
        self.checked[rows] = 0

    def update(self, columns: torch.Tensor) -> torch.Tensor:
        """Look at each slot's tokens ``checked .. columns-1`` (``columns [slots]``: tokens it has);
        returns which slots' rows have stopped."""
        new = int((columns - self.checked).max())
        width = self.history.shape[1]
        for offset in range(new):
            count = self.checked + 1 + offset  # tokens up to and including the one looked at
            look = (self.ends < 0) & (count <= columns)
            if not bool(look.any()):
                continue
            token = self.history.gather(1, (self.tail + count - 1).clamp(max=width - 1)[:, None])[:, 0]
            eos = look & torch.isin(token, self.eos_ids)
            self.ends = torch.where(eos, count - 1, self.ends)
            if self.criteria is not None:
                window = (count[:, None] + torch.arange(self.tail, device=count.device)).clamp(max=width - 1)
                hit = look & ~eos & self.criteria(self.history.gather(1, window), None)
                self.ends = torch.where(hit, count, self.ends)
        self.checked = torch.maximum(self.checked, columns)
        return self.ends >= 0

    def counts(self, columns: torch.Tensor) -> torch.Tensor:
        """Tokens each slot's row keeps: to its stop, else all ``columns`` it has."""
        return torch.where(self.ends >= 0, self.ends, columns)

    def tokens(self, rows: Sequence[int], counts: Sequence[int]) -> list[list[int]]:
        """The first ``counts[i]`` generated tokens of slot ``rows[i]`` (one copy to the host)."""
        picked = self.history[torch.tensor(list(rows), device=self.history.device), self.tail :].tolist()
        return [row[:count] for row, count in zip(picked, counts)]


@dataclass
class RefillCounts:
    """What a :func:`refill_static` run computed: decode steps (each computes every slot),
    slot-steps (steps x slots), the tokens the finished rows keep, and prefill calls."""

    slots: int = 0
    steps: int = 0
    slot_steps: int = 0
    kept_tokens: int = 0
    prefills: int = 0
    rows: int = 0


@dataclass
class Finished:
    """Rows handed out at one check: their indices in the pool, tokens (to their stop), the
    prefill row chunk each was prefilled with, and the seconds since the previous hand-out."""

    items: list[int]
    tokens: list[list[int]]
    prefill_row_chunks: list[int]
    seconds: float
    #: Slots written in the slots' cache at the check (every slot, left padding included).
    stored_tokens: int


@dataclass
class _Slots:
    """Device tensors the step reads and advances, one entry per slot: the token to write
    ``[slots, 1]``, its rotary position ``[slots, 1]``, the cache slot it is written to
    (``row * capacity + position``), the output column, the mask over the capacity, the sampling
    keys, and where each row's tokens start in the flattened history."""

    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    columns: torch.Tensor
    mask: torch.Tensor
    keys: torch.Tensor
    history: torch.Tensor
    base: torch.Tensor
    budget: int

    def advance(self, next_ids: torch.Tensor) -> None:
        """Record ``next_ids [slots]``; rows short of the budget move one token on, the others
        stay frozen (device ops only)."""
        self.history.view(-1).index_copy_(0, self.base + self.columns, next_ids)
        live = (self.columns < self.budget).long()
        self.ids.copy_(next_ids[:, None])
        self.positions.add_(live[:, None])
        self.slots.add_(live)
        self.columns.add_(live)


def refill_static(
    model: Any,
    make_cache: Callable[[int], QuantKVCache],
    prompts: Sequence[Sequence[int]],
    batch: int,
    max_new_tokens: int,
    stops: Callable[[int, torch.device], SlotStops],
    pad_id: int,
    sampler: RowSampler | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    graph: bool | None = None,
    counts: RefillCounts | None = None,
) -> Iterator[Finished]:
    """Greedy (or, with ``sampler``, seeded sampled) continuations of ``prompts`` through
    ``batch`` slots, yielded as rows finish (:class:`Finished`, in finishing order).

    Parameters
    ----------
    make_cache:
        ``capacity_hint -> `` a fresh cache (the slots' cache, and one per refill prefill); static
        scales only (:func:`refill_refusal`).
    stops:
        ``(slots, device) -> SlotStops`` for the run.
    pad_id:
        Left padding of a prefill group.
    sampler:
        Keys per pool item (``sampler.keys [len(prompts)]``) and the sampling spec; None: greedy.
    graph:
        Capture the step in a CUDA graph (default: on CUDA).
    counts:
        Filled with what the run computed.
    """
    device = input_device(model)
    batch = max(1, min(batch, len(prompts)))
    graph = device.type == "cuda" if graph is None else graph
    counts = counts if counts is not None else RefillCounts()
    counts.slots = batch
    budget = max_new_tokens
    capacity_needed = max(map(len, prompts)) + budget
    keys_all = None if sampler is None else sampler.keys.to(device)

    def choose(logits: torch.Tensor, steps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if sampler is None else sample_next(logits, keys, steps, sampler.spec)

    cache = make_cache(capacity_needed)
    waiting = deque(range(len(prompts)))
    first_items = [waiting.popleft() for _ in range(batch)]
    argument = {cache_argument(model): cache}
    with torch.inference_mode(), fused_decode(model, cache) as on:
        ids, attention_mask = left_pad([prompts[i] for i in first_items], pad_id, device)
        logits = chunked_prefill(model, cache, ids, attention_mask, prefill_chunk)
        counts.prefills += 1
        capacity = cache.layers[0].capacity
        if len({layer.capacity for layer in cache.layers}) != 1:
            raise ValueError("refilled static decoding needs one capacity for every layer")
        if not on or not all(fusable(layer) for layer in cache.layers):
            raise ValueError(
                "refilled static decoding needs the fused decode attention; check refill_refusal"
            )
        if capacity < capacity_needed:
            raise ValueError(f"the cache holds {capacity} tokens per row, {capacity_needed} are needed")
        row_stops = stops(batch, device)
        rows = torch.arange(batch, device=device)
        prompt = ids.shape[1]
        mask = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)
        mask[:, 0, 0, :prompt] = attention_mask.bool()
        keys = torch.zeros(batch, dtype=torch.long, device=device)
        if keys_all is not None:
            keys.copy_(keys_all[first_items])
        state = _Slots(
            ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
            positions=_next_position(attention_mask),
            slots=rows * capacity + prompt,
            columns=torch.ones(batch, dtype=torch.long, device=device),
            mask=mask,
            keys=keys,
            history=row_stops.history,
            base=rows * row_stops.history.shape[1] + row_stops.tail,
            budget=budget,
        )
        first = choose(logits, torch.zeros(batch, dtype=torch.long, device=device), keys)
        state.ids.copy_(first[:, None])
        row_stops.start(rows, [prompts[i] for i in first_items], first)
        item_of: list[int | None] = list(first_items)
        chunk_of = [row_chunk(prefill_chunk, batch)] * batch

        def step() -> None:
            state.mask.view(-1).index_fill_(0, state.slots, True)  # each new token attends to itself
            out = model(input_ids=state.ids, attention_mask=state.mask, position_ids=state.positions,
                        logits_to_keep=1, **argument).logits  # fmt: skip
            state.advance(choose(out[:, -1], state.columns, state.keys))

        def refill(free: list[int]) -> None:
            """Prefill waiting prompts into slots ``free`` (outside the captured step), at most
            ``batch / REFILL_SHARE`` of them per prefill."""
            items = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
            for row in free[len(items) :]:  # nothing waits for these: they idle, frozen
                item_of[row] = None
                state.columns[row] = budget
            group = max(1, batch // REFILL_SHARE)
            for first in range(0, len(items), group):
                prefill_into(free[first : first + group], items[first : first + group])

        def prefill_into(taken: list[int], items: list[int]) -> None:
            """Prefill ``items`` in a fresh cache and move their stored bytes into slots ``taken``."""
            group_ids, group_mask = left_pad([prompts[i] for i in items], pad_id, device)
            width = group_ids.shape[1]
            fresh = make_cache(width)
            group_logits = chunked_prefill(model, fresh, group_ids, group_mask, prefill_chunk)
            counts.prefills += 1
            where = torch.tensor(taken, dtype=torch.long, device=device)
            for layer, source in zip(cache.layers, fresh.layers):
                for dst, src in zip(layer.buffers.tensors(), source.buffers.tensors()):
                    dst.view(batch, capacity, *dst.shape[1:])[where, :width] = src.view(
                        len(items), source.capacity, *src.shape[1:]
                    )[:, :width]
            del fresh
            state.mask[where] = False
            state.mask[where, 0, 0, :width] = group_mask.bool()
            state.positions[where] = _next_position(group_mask)
            state.slots[where] = where * capacity + width
            state.columns[where] = 1
            group_keys = torch.zeros(len(items), dtype=torch.long, device=device)
            if keys_all is not None:
                group_keys = keys_all[items]
                state.keys[where] = group_keys
            token = choose(group_logits, torch.zeros(len(items), dtype=torch.long, device=device), group_keys)
            state.ids[where] = token[:, None]
            row_stops.start(where, [prompts[i] for i in items], token)
            for row, item in zip(taken, items):
                item_of[row], chunk_of[row] = item, row_chunk(prefill_chunk, len(items))

        cache.begin_static_decode(state.slots)
        replay: Callable[[], None] = step
        since_check, next_check = 0, min(static_decode.CHECK_EVERY, budget - 1)
        clock = time.perf_counter()
        try:
            while True:
                if since_check >= next_check:
                    since_check = 0
                    stopped = row_stops.update(state.columns)
                    done = (stopped | (state.columns >= budget)).tolist()
                    free = [row for row in range(batch) if done[row] and item_of[row] is not None]
                    if free:
                        kept = row_stops.counts(state.columns).tolist()
                        finished = Finished(
                            [item_of[row] for row in free],
                            row_stops.tokens(free, [kept[row] for row in free]),
                            [chunk_of[row] for row in free],
                            time.perf_counter() - clock,
                            int((state.slots % capacity).sum()),
                        )
                        counts.rows += len(free)
                        counts.kept_tokens += sum(kept[row] for row in free)
                        yield finished
                        clock = time.perf_counter()
                        refill(free)
                    if all(item is None for item in item_of):
                        break
                    # The next check: after CHECK_EVERY steps, or as soon as a row reaches the budget.
                    columns = state.columns.tolist()
                    next_check = min(static_decode.CHECK_EVERY,
                                     *(budget - columns[row] for row in range(batch) if item_of[row] is not None))  # fmt: skip
                    if next_check <= 0:  # a row is full already (a budget of one token): hand it out first
                        continue
                if graph and counts.steps == 0:
                    run = static_decode.on_side_stream(step)  # warm-up, as CUDA graph capture wants it
                elif graph and counts.steps == 1:
                    replay = run = static_decode.capture(step)
                else:
                    run = replay
                run()
                counts.steps += 1
                counts.slot_steps += batch
                since_check += 1
        finally:
            cache.end_static_decode(int((state.slots % capacity).max()), replayed=graph and counts.steps > 2)


def _next_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[rows, 1]`` rotary position of the token after each left-padded prompt of ``attention_mask``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -1:] + 1


def generate_refilled(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    make_cache: Callable[[int], QuantKVCache],
    config: GenerationConfig,
    stops: Sequence[str],
    batch: int,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    sampler: RowSampler | None = None,
    counts: RefillCounts | None = None,
) -> Iterator[tuple[list[int], list[Continuation], list[dict[str, Any]]]]:
    """:func:`refill_static` with ``generate``'s stops (``config``: budget, EOS ids, stop strings):
    yields, as rows finish, their indices in ``prompt_ids``, their continuations (decoded and cut
    at ``stops``) and per row the stats a batch of :func:`~fp4kv_cli.evaluate.generate.generate_batch`
    gets (``seconds``: the seconds since the previous hand-out, shared by the rows handed out)."""
    cuda = input_device(model).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    caches: list[QuantKVCache] = []

    def slots_cache(hint: int) -> QuantKVCache:
        made = make_cache(hint)
        if not caches:
            caches.append(made)  # the first is the slots' cache
        return made

    def slot_stops(slots: int, where: torch.device) -> SlotStops:
        return SlotStops(slots, config.max_new_tokens, config.eos_token_id or [], tokenizer,
                         config.stop_strings, tokenizer.pad_token_id, where)  # fmt: skip

    for finished in refill_static(model, slots_cache, prompt_ids, batch, config.max_new_tokens, slot_stops,
                                  tokenizer.pad_token_id, sampler, prefill_chunk, counts=counts):  # fmt: skip
        cache = caches[0]
        texts = continuations(
            tokenizer,
            torch.tensor([row + [0] * (config.max_new_tokens - len(row)) for row in finished.tokens]),
            torch.tensor([len(row) for row in finished.tokens]),
            stops,
        )
        shared = {
            "seconds": finished.seconds,
            "decode_attention": "graph" if cuda else "static",
            "kv_bytes_per_token": cache.bytes_per_token(),
            "kv_stored_bytes": cache.bytes_per_token() * finished.stored_tokens,
            "kv_capacity_bytes": cache.capacity_bytes(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        }
        stats = [{**shared, "prefill_row_chunk": chunk} for chunk in finished.prefill_row_chunks]
        yield finished.items, texts, stats
