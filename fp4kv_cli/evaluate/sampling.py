"""Seeded, batch-independent sampling of next tokens: temperature, top-p, counter-based noise.

Every row of a batch samples with its own 32-bit key (from the run's seed, the question index and
the sample number, :func:`row_keys`), and the noise of token ``v`` at generation step ``t`` is a
hash of ``(key, t, v)``: no generator state, so a row's tokens do not depend on which rows share
its batch, on the batch size, on the decode path (``generate`` or the static / CUDA graph step,
where the step counter is a device tensor) or on how often the run was resumed. The token is
drawn by the Gumbel-max trick, ``argmax(log p_v - log(-log u_v))``, over the top-p nucleus of
``softmax(logits / T)`` restricted to the :data:`TOP_K` most likely tokens (as transformers'
sampling defaults to ``top_k=50``): an exact sample of that distribution for uniform ``u``, and
the noise is hashed for those candidates only, not the whole vocabulary, at every step.

Formats share the keys (the KV format is not part of them): each format's sample ``k`` of a
question sees the same noise, so where two formats' distributions agree they pick the same token.
These common random numbers make the paired per-question difference far less noisy than
independent draws would, without biasing either format's accuracy.

The hash is Chris Wellons' ``lowbias32`` in int64 arithmetic, each 32-bit product split into
16-bit halves so no intermediate overflows on any device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

MASK32 = 0xFFFFFFFF
#: Candidate tokens per step (transformers' default ``top_k``).
TOP_K = 50
#: Odd constants that separate the step and token streams of the hash.
STEP_SALT = 0x9E3779B9
TOKEN_SALT = 0x85EBCA6B


@dataclass(frozen=True)
class SamplingSpec:
    """How sampled generations draw tokens: ``softmax(logits / temperature)`` restricted to the
    smallest set of top tokens holding ``top_p`` of the mass; ``seed`` picks the noise."""

    temperature: float
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` of the low 32 bits of int64 ``x``: a bijection of ``[0, 2**32)`` with full
    avalanche, returned as int64 in that range."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_keys(
    seed: int, questions: Sequence[int], samples: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[rows]`` int64 keys of rows that generate sample ``samples[r]`` of question ``questions[r]``."""
    q = torch.tensor(list(questions), dtype=torch.long, device=device)
    k = torch.tensor(list(samples), dtype=torch.long, device=device)
    base = hash32(torch.full_like(q, seed & MASK32))
    return hash32(hash32(base ^ q) ^ k)


def uniforms(keys: torch.Tensor, step: torch.Tensor | int, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in (0, 1) of vocabulary ids ``tokens`` (``[rows, c]`` int64, or ``[c]``
    for every row) for each row's ``key`` at generation ``step`` (an int, a ``[1]`` int64 device
    tensor for every row, or ``[rows]``: each row's own step): ``[rows, c]``."""
    step = torch.as_tensor(step, dtype=torch.long, device=keys.device).reshape(-1)
    state = hash32(keys ^ hash32(step + STEP_SALT))[:, None]  # [rows, 1]
    bits = hash32(state ^ hash32(tokens + TOKEN_SALT)) >> 8  # 24 bits: exact in float32
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def sample_next(
    logits: torch.Tensor, keys: torch.Tensor, step: torch.Tensor | int, spec: SamplingSpec
) -> torch.Tensor:
    """Tokens ``[rows]`` drawn from ``logits [rows, vocab]`` (any float dtype, computed in float32)
    with each row's key at ``step``."""
    top, candidates = logits.float().topk(min(TOP_K, logits.shape[-1]), dim=-1)  # sorted, best first
    logp = torch.log_softmax(top / spec.temperature, dim=-1)
    if spec.top_p < 1:
        probs = logp.exp()
        beyond = probs.cumsum(-1) - probs >= spec.top_p  # the better tokens already hold top_p
        logp = logp.masked_fill(beyond, float("-inf"))
    gumbel = -torch.log(-torch.log(uniforms(keys, step, candidates)))
    return candidates.gather(-1, (logp + gumbel).argmax(-1, keepdim=True)).squeeze(-1)


class RowSampler:
    """``(logits [rows, vocab], step) -> tokens [rows]`` for one batch: each row samples with its
    own key (see :func:`row_keys`)."""

    def __init__(self, spec: SamplingSpec, keys: torch.Tensor) -> None:
        self.spec = spec
        self.keys = keys

    def __call__(self, logits: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
        return sample_next(logits, self.keys.to(logits.device), step, self.spec)


class ChosenTokenProcessor(LogitsProcessor):
    """Makes ``generate``'s greedy choice the token ``sampler`` draws: every other score becomes
    ``-inf``. The step is the number of tokens generated so far (after a ``prompt_width``-token
    left-padded prompt)."""

    def __init__(self, sampler: RowSampler, prompt_width: int) -> None:
        self.sampler = sampler
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = self.sampler(scores, input_ids.shape[1] - self.prompt_width)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)
