"""How closely a KV format reproduces the bf16 cache on teacher-forced GSM8K text.

Each sample is a few-shot prompt followed by its gold answer, run without padding. The prompt
is prefilled in one forward; the answer is then fed in chunks of :data:`ANSWER_CHUNK` tokens,
so every answer token attends to the quantized K/V read back from the cache buffers (plus the
fresh K/V of its own chunk, as a prefill kernel would). At every position that predicts an
answer token we compare the next-token distribution with the bf16 cache's:

- ``kl``: mean over those positions of ``KL(p_bf16 || p_kv)`` in nats (float32 softmax);
- ``top1``: fraction of positions where both argmaxes agree;
- ``k_rel_error`` / ``v_rel_error``: per layer, ``||deq(q(K)) - K|| / ||K||`` (and V) over every
  stored token of every sample (with K centering, the reconstruction includes the offset).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.models import cache_argument, input_device

#: Answer tokens per teacher-forced forward after the prompt prefill.
ANSWER_CHUNK = 16


@dataclass(frozen=True)
class Fidelity:
    """Teacher-forced agreement of one KV format with the bf16 cache."""

    samples: int
    tokens: int
    kl: float
    top1: float
    k_rel_error: list[float]
    v_rel_error: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def teacher_forced_logits(
    model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int], cache: QuantKVCache
) -> torch.Tensor:
    """Logits ``[len(answer_ids), vocab]`` float32 at the positions predicting each answer token."""
    device = input_device(model)
    argument = cache_argument(model)
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], dtype=torch.long, device=device)
    prompt_len, total = len(prompt_ids), ids.shape[1]
    pieces = []
    with torch.inference_mode():
        out = model(input_ids=ids[:, :prompt_len], use_cache=True, logits_to_keep=1, **{argument: cache})
        pieces.append(out.logits[0, -1:].float())
        for start in range(prompt_len, total - 1, ANSWER_CHUNK):
            chunk = ids[:, start : min(start + ANSWER_CHUNK, total - 1)]
            pieces.append(model(input_ids=chunk, use_cache=True, **{argument: cache}).logits[0].float())
    return torch.cat(pieces)


def measure_fidelity(
    model: Any,
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    make_cache: Callable[[str, int], QuantKVCache],
    kv_dtypes: Sequence[str],
    reference: str = "bf16",
    on_sample: Callable[[], None] | None = None,
) -> dict[str, Fidelity]:
    """Fidelity of each of ``kv_dtypes`` against the ``reference`` format on ``samples``.

    Parameters
    ----------
    samples:
        ``(prompt_ids, answer_ids)`` token lists, each run as one unpadded sequence.
    make_cache:
        ``make_cache(kv_dtype, capacity_hint)`` returns a fresh cache for one sequence (the
        ``reference`` format's, also listed in ``kv_dtypes``, is run once per sample).
    """
    kl_sum = dict.fromkeys(kv_dtypes, 0.0)
    agree_sum = dict.fromkeys(kv_dtypes, 0)
    layer_sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for prompt_ids, answer_ids in samples:
        length = len(prompt_ids) + len(answer_ids)
        ref_cache = make_cache(reference, length)
        ref_cache.track_errors()
        ref = torch.log_softmax(teacher_forced_logits(model, prompt_ids, answer_ids, ref_cache), -1)
        tokens += ref.shape[0]
        for kv in kv_dtypes:
            if kv == reference:  # the same computation as the reference pass: its results
                cache, logp = ref_cache, ref
            else:
                cache = make_cache(kv, length)
                cache.track_errors()
                logp = torch.log_softmax(teacher_forced_logits(model, prompt_ids, answer_ids, cache), -1)
            kl_sum[kv] += float((ref.exp() * (ref - logp)).sum())
            agree_sum[kv] += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            errors = cache.error_sums().double()
            layer_sums[kv] = errors if kv not in layer_sums else layer_sums[kv] + errors
        if on_sample is not None:
            on_sample()
    results = {}
    for kv in kv_dtypes:
        per_layer = layer_sums[kv]
        results[kv] = Fidelity(
            samples=len(samples),
            tokens=tokens,
            kl=kl_sum[kv] / tokens,
            top1=agree_sum[kv] / tokens,
            k_rel_error=_ratios(per_layer[:, 0], per_layer[:, 1]),
            v_rel_error=_ratios(per_layer[:, 2], per_layer[:, 3]),
        )
    return results


def _ratios(err: torch.Tensor, ref: torch.Tensor) -> list[float]:
    return (err / ref.clamp(min=1e-30)).sqrt().tolist()
