"""Split K's quantization error into the part attention ignores and the part it sees.

Attention is invariant to a component of K that is the same for every token (softmax cancels
``q . c``). So for K of one layer and head, ``K = mu + K_var`` with ``mu`` the per-channel mean
over tokens, and the damage of a format is the error left in the token-varying part:
``||E - mean_t(E)|| / ||K_var||`` with ``E = deq(q(K)) - K``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from fp4kv_cli.analysis.round_trip import round_trip
from fp4kv_cli.quant.methods import KVCacheMethod


@dataclass(frozen=True)
class KDecomposition:
    """Per KV head of one layer (lists indexed by head)."""

    constant_share: list[float]
    """``T * ||mu||^2 / ||K||^2``: how much of K's energy is the token-constant part."""
    varying_error: list[float]
    """Relative error in the token-varying part when K is stored as is."""
    varying_error_centered: list[float]
    """The same when ``K - mu`` is stored (K centering)."""
    relative_error: list[float]
    """Plain ``||E|| / ||K||`` when K is stored as is."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def dynamic_scale(method: KVCacheMethod, x: torch.Tensor) -> torch.Tensor | None:
    """The per-tensor scale ``method`` would use for ``x`` from its own amax (None if none)."""
    return method.scale_from_amax(x.abs().max().clamp(min=1e-30))


def decompose_k(method: KVCacheMethod, keys: torch.Tensor) -> KDecomposition:
    """Decompose the error ``method`` makes on ``keys [tokens, heads, head_dim]`` (real tokens only)."""
    k = keys.to(torch.float32)
    mu = k.mean(dim=0, keepdim=True)
    varying = k - mu
    error_raw = round_trip(method, k, dynamic_scale(method, k)) - k
    error_centered = round_trip(method, varying, dynamic_scale(method, varying)) - varying

    def per_head(x: torch.Tensor) -> torch.Tensor:
        return x.square().sum(dim=(0, 2))

    tokens = k.shape[0]
    energy, energy_varying = per_head(k), per_head(varying).clamp(min=1e-30)

    def varying_part(error: torch.Tensor) -> list[float]:
        return (per_head(error - error.mean(dim=0, keepdim=True)) / energy_varying).sqrt().tolist()

    return KDecomposition(
        constant_share=(tokens * mu.square().sum(dim=(0, 2)) / energy.clamp(min=1e-30)).tolist(),
        varying_error=varying_part(error_raw),
        varying_error_centered=varying_part(error_centered),
        relative_error=(per_head(error_raw) / energy.clamp(min=1e-30)).sqrt().tolist(),
    )
