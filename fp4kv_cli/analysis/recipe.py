"""Choose per-layer K/V formats under a bytes-per-element budget from measured sensitivities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.registry import KV_CACHE_METHOD_REGISTRY


def bytes_per_element(fmt: str) -> float:
    """Stored bytes per cached element of ``fmt`` (block scales included)."""
    return KV_CACHE_METHOD_REGISTRY[fmt].bits_per_element / 8


@dataclass
class Recipe:
    """Per-layer K and V formats, plus whether K is centered."""

    k: list[str]
    v: list[str]
    center_k: bool
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_per_element(self) -> float:
        """Mean stored bytes per cached element over every layer's K and V."""
        costs = [bytes_per_element(f) for f in self.k + self.v]
        return sum(costs) / len(costs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with the derived bytes per element)."""
        return {**asdict(self), "bytes_per_element": self.bytes_per_element}


def greedy_recipe(
    sensitivity: Mapping[str, Sequence[float]],
    base: str,
    upgrade: str,
    budget: float,
    kl_budget: float,
    center_k: bool,
) -> Recipe:
    """Start every K and V at ``base``; while the mean bytes per element stay within ``budget``,
    move the most sensitive tensor (largest single-tensor KL vs bf16) to ``upgrade``, as long as
    its KL exceeds ``kl_budget``.

    Parameters
    ----------
    sensitivity:
        ``{"k": [KL per layer], "v": [KL per layer]}`` measured with only that tensor in ``base``.
    """
    layers = len(sensitivity["k"])
    if len(sensitivity["v"]) != layers or layers == 0:
        raise FP4KVError("sensitivity needs one K and one V value per layer")
    recipe = Recipe(k=[base] * layers, v=[base] * layers, center_k=center_k)
    if recipe.bytes_per_element > budget:
        raise FP4KVError(
            f"{base} alone needs {recipe.bytes_per_element:.4f} bytes per element, over the budget {budget}; "
            "raise --budget"
        )
    step = (bytes_per_element(upgrade) - bytes_per_element(base)) / (2 * layers)
    ranked = sorted(
        ((kl, kind, layer) for kind in ("k", "v") for layer, kl in enumerate(sensitivity[kind])),
        reverse=True,
    )
    for kl, kind, layer in ranked:
        if kl <= kl_budget:
            break
        if recipe.bytes_per_element + step > budget + 1e-12:
            recipe.notes.append(f"budget reached: {kind.upper()} of layer {layer} (KL {kl:.4g}) stays {base}")
            break
        getattr(recipe, kind)[layer] = upgrade
        recipe.notes.append(f"{kind.upper()} of layer {layer} -> {upgrade} (alone: KL {kl:.4g})")
    return recipe
