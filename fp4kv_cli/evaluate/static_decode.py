"""Greedy (or seeded sampled) decoding with static shapes, so each decode step can be one CUDA
graph replay.

``model.generate`` runs a decode step as hundreds of small kernels, each launched from Python;
at batch 128 on a small model the GPU then waits on the host. Here every decode step has the
same shapes and no host-side state: the token, its rotary position, the slot it is written to and
the attention mask over the cache's whole capacity live in device tensors that the step itself
advances, the cache writes at that slot (:meth:`QuantKVCache.begin_static_decode`) and the fused
decode-attention kernel reads the buffers under the mask. On CUDA the step is captured once
into a CUDA graph and replayed; elsewhere (the CPU tests) the same step runs eagerly.

Rows are independent, so a row's tokens up to its stop are those ``generate`` would produce (up
to near-ties: the kernel sums over the whole capacity in other splits than over the filled length,
so the last bits of a score can differ); the loop runs until every row has stopped (checked every
``CHECK_EVERY`` steps) or the budget ends, and the caller cuts each row at its stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fp4kv_cli import fused_attention
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.evaluate.prefill import DEFAULT_PREFILL_CHUNK, chunked_prefill, mask_positions
from fp4kv_cli.fused_attention import fusable, fused_decode
from fp4kv_cli.models import cache_argument

#: Steps between two host checks of whether every row has stopped.
CHECK_EVERY = 16


def static_decode_refusal(model: Any, cache: Any, device: torch.device | None = None) -> str | None:
    """Why :func:`greedy_static` cannot run ``model`` with ``cache``, or None where it can: the
    decode-attention kernel must read every layer
    (:func:`~fp4kv_cli.fused_attention.every_layer_refusal`), every layer must use full attention
    (the static mask has no sliding window) and the rotary frequencies must not follow the length.
    ``device`` judges for another device than the model's."""
    return fused_attention.every_layer_refusal(model, cache, device) or static_shape_refusal(model)


def static_shape_refusal(model: Any) -> str | None:
    """Why the static-shape step cannot run ``model`` whatever its cache (sliding-window layers,
    rotary frequencies that follow the length), or None; the model half of
    :func:`static_decode_refusal`."""
    text = model.config.get_text_config(decoder=True)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:  # no per-layer types (Mistral): one sliding window for every layer, if set
        window = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
        layer_types = ["sliding_attention" if window else "full_attention"]
    if set(layer_types) != {"full_attention"}:
        return "the model has sliding-window layers, which the static-shape mask does not window"
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "default")))
    if "dynamic" in rope_type or rope_type == "longrope":
        return f"{rope_type} RoPE frequencies follow the length (a host sync every step)"
    return None


def static_decode_supported(model: Any, cache: Any) -> bool:
    """Whether :func:`greedy_static` can run ``model`` with ``cache`` (:func:`static_decode_refusal`
    finds no reason not to)."""
    return static_decode_refusal(model, cache) is None


def decode_path(model: Any, cache: Any, device: torch.device | None = None) -> tuple[str, str]:
    """The decode read ``--decode-attention graph`` takes for ``model`` with ``cache`` (``graph``,
    ``fused`` or ``gather``; ``fused`` may still leave single layers on the gather read, see
    :func:`~fp4kv_cli.fused_attention.decode_read`) and why; ``device`` as in
    :func:`static_decode_refusal`."""
    refusal = fused_attention.fused_decode_refusal(model, cache, device)
    if refusal is not None:
        return "gather", refusal
    refusal = fused_attention.layer_refusal(model, cache, device) or static_shape_refusal(model)
    if refusal is not None:
        return "fused", refusal
    return "graph", "static-shape steps through the kernel, replayed as CUDA graphs"


def greedy_static(
    model: Any,
    cache: QuantKVCache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stopped: Callable[[torch.Tensor], torch.Tensor] | None = None,
    graph: bool | None = None,
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> torch.Tensor:
    """Greedy continuations ``[batch, n]`` (``n <= max_new_tokens``) of left-padded ``input_ids``.

    Parameters
    ----------
    cache:
        A fresh cache with room for ``prompt + max_new_tokens - 1`` tokens per row (its capacity
        hint; the last token is never written).
    stopped:
        ``tokens [batch, n] -> bool [batch]``: which rows have stopped (EOS, a stop string); the
        loop ends when all have. None runs the whole budget.
    graph:
        Capture the step in a CUDA graph (default: on CUDA).
    choose:
        ``(logits [batch, vocab], step) -> tokens [batch]`` picks each next token, ``step`` (a
        ``[1]`` int64 device tensor) counting the tokens generated before it; device ops only,
        as it runs inside the graph (e.g. :class:`~fp4kv_cli.evaluate.sampling.RowSampler`).
        None: the argmax (greedy).
    prefill_chunk:
        Prompt tokens per prefill forward over the batch (:func:`~fp4kv_cli.evaluate.prefill.chunked_prefill`).

    Call it only where :func:`static_decode_supported` holds.
    """
    device = input_ids.device
    batch, prompt = input_ids.shape
    graph = device.type == "cuda" if graph is None else graph
    choose = choose or _argmax
    argument = {cache_argument(model): cache}
    with torch.inference_mode(), fused_decode(model, cache) as on:
        positions = mask_positions(attention_mask)
        logits = chunked_prefill(model, cache, input_ids, attention_mask, prefill_chunk, positions=positions)
        tokens = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
        tokens[:, 0] = choose(logits, torch.zeros(1, dtype=torch.long, device=device))
        capacities = {layer.capacity for layer in cache.layers}
        if len(capacities) != 1:
            raise ValueError(f"static decoding needs one capacity for every layer, got {sorted(capacities)}")
        capacity = capacities.pop()
        if not on or not all(fusable(layer) for layer in cache.layers):
            raise ValueError(
                "static decoding needs the fused decode attention; check static_decode_supported"
            )
        if capacity < prompt + max_new_tokens - 1:
            raise ValueError(
                f"the cache holds {capacity} tokens per row, {prompt + max_new_tokens - 1} are needed"
            )
        mask = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)
        mask[:, 0, 0, :prompt] = attention_mask.bool()
        state = _StepState(
            ids=tokens[:, :1].clone(),
            positions=positions[:, -1:] + 1,
            cache_position=torch.full((1,), prompt, dtype=torch.long, device=device),
            slots=torch.arange(batch, device=device) * capacity + prompt,
            column=torch.ones(1, dtype=torch.long, device=device),
            mask=mask,
            tokens=tokens,
        )

        def step() -> None:
            state.mask.index_fill_(3, state.cache_position, True)  # the new token attends to itself
            out = model(input_ids=state.ids, attention_mask=state.mask, position_ids=state.positions,
                        logits_to_keep=1, **argument).logits  # fmt: skip
            state.advance(choose(out[:, -1], state.column))

        cache.begin_static_decode(state.slots)
        done = 1
        try:
            done = _run_steps(
                step,
                max_new_tokens,
                graph,
                lambda n: stopped is not None and bool(stopped(tokens[:, :n]).all()),
            )
        finally:
            cache.end_static_decode(prompt + done - 1, replayed=graph and done > 2)
    return tokens[:, :done]


def _argmax(logits: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)


@dataclass
class _StepState:
    """Device tensors a static step reads and advances: the token to write and its rotary position
    per row, the cache position all rows write (``[1]``) and each row's slot there
    (``[batch]``, ``row * capacity + position``), the output column, the mask and the output tokens."""

    ids: torch.Tensor
    positions: torch.Tensor
    cache_position: torch.Tensor
    slots: torch.Tensor
    column: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor

    def advance(self, next_ids: torch.Tensor) -> None:
        """Record ``next_ids [batch]`` and move every counter one token on (device ops only)."""
        self.tokens.index_copy_(1, self.column, next_ids[:, None])
        self.ids.copy_(next_ids[:, None])
        self.positions.add_(1)
        self.cache_position.add_(1)
        self.slots.add_(1)
        self.column.add_(1)


def _run_steps(
    step: Callable[[], None], max_new_tokens: int, graph: bool, all_stopped: Callable[[int], bool]
) -> int:
    """Run decode steps until ``max_new_tokens`` tokens exist or ``all_stopped(count)`` holds at a
    check; returns the token count. With ``graph`` the first step runs eagerly (it compiles the
    kernels and warms the allocator), the second is captured, and every later one is a replay."""
    done = 1
    replay: Callable[[], None] = step
    while done < max_new_tokens:
        if graph and done == 1:
            replay = on_side_stream(step)  # warm-up, as CUDA graph capture wants it
        elif graph and done == 2:
            replay = capture(step)
        replay()
        done += 1
        if done % CHECK_EVERY == 0 and all_stopped(done):
            break
    return done


def on_side_stream(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` run on a side stream that the current stream then waits for."""

    def run() -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)

    return run


def capture(step: Callable[[], None]) -> Callable[[], None]:
    """A CUDA graph of ``step`` (capturing runs nothing); returns its replay."""
    cuda_graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(cuda_graph):
        step()
    return cuda_graph.replay
