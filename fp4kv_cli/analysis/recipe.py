"""Choose per-layer K/V formats under a bytes-per-element budget from measured sensitivities."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.registry import KV_CACHE_METHOD_REGISTRY
from fp4kv_cli.quant.scales import ScalesFile


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


def check_budgets(base: str, budget: float, kl_budget: float) -> None:
    """Raise :class:`FP4KVError` for budgets no recipe over ``base`` can meet (before any work)."""
    if budget <= 0:
        raise FP4KVError(f"--budget must be > 0, got {budget}")
    if kl_budget < 0:
        raise FP4KVError(f"--kl-budget must be >= 0, got {kl_budget}")
    if bytes_per_element(base) > budget:
        raise FP4KVError(
            f"{base} alone needs {bytes_per_element(base):.4f} bytes per element, over the budget {budget}; "
            "raise --budget"
        )


def check_recipe_path(path: str | Path | None) -> None:
    """Raise :class:`FP4KVError` if the recipe file ``path`` names a folder."""
    if path is not None and Path(path).is_dir():
        raise FP4KVError(f"--write-recipe {path} is a folder; give a file path")


def write_recipe_file(path: str | Path, scales_file: ScalesFile, recipe: Recipe) -> None:
    """A copy of the scales file with per-layer ``k_format`` / ``v_format`` (atomic)."""
    data = copy.deepcopy(scales_file.data)
    for entry, k_format, v_format in zip(data["layers"], recipe.k, recipe.v):
        entry["k_format"], entry["v_format"] = k_format, v_format
    write_json_atomic(path, data)


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
    check_budgets(base, budget, kl_budget)
    recipe = Recipe(k=[base] * layers, v=[base] * layers, center_k=center_k)
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
