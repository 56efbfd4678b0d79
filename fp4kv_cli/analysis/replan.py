"""Re-plan a mixed-format recipe under another budget from a saved ``analysis.json``.

``fp4kv analyze`` measures every tensor's lone KL (the expensive part: one teacher-forced run per
tensor) and then picks a recipe with :func:`greedy_recipe`. The pick depends only on those KLs and
the two budgets, so a different ``--budget`` / ``--kl-budget`` needs no model run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fp4kv_cli.analysis.recipe import Recipe, greedy_recipe
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.scales import ScalesFile


def load_analysis(path: str | Path) -> dict[str, Any]:
    """The ``analysis.json`` written by ``fp4kv analyze`` at ``path``."""
    try:
        analysis = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FP4KVError(f"analysis file {path} does not exist; make one with fp4kv analyze") from None
    except (OSError, json.JSONDecodeError) as err:
        raise FP4KVError(f"cannot read analysis file {path}: {err}") from None
    if not isinstance(analysis, dict) or not {"settings", "layers", "recipe"} <= set(analysis):
        raise FP4KVError(f"{path} is not an fp4kv analysis.json; make one with fp4kv analyze")
    return analysis


def replan(analysis: dict[str, Any], scales_file: ScalesFile, budget: float, kl_budget: float) -> Recipe:
    """The recipe ``fp4kv analyze`` would have chosen with ``budget`` / ``kl_budget`` from the lone
    KLs it saved (centered K where the analysis centered K), checked against ``scales_file``."""
    layers = analysis["layers"]
    if len(layers) != len(scales_file.layers):
        raise FP4KVError(
            f"the analysis has {len(layers)} layers but the scales file {len(scales_file.layers)}; "
            "pass the scales file the analysis used"
        )
    center_k = bool(analysis["recipe"]["center_k"])
    if center_k and any(layer.k_offset is None for layer in scales_file.layers):
        raise FP4KVError(
            "the analysis centered K but the scales file has no k_offset; pass the --center-k scales "
            "file the analysis used"
        )
    k_key = "k_centered" if center_k else "k"
    sensitivity = {"k": [layer[k_key]["kl"] for layer in layers], "v": [layer["v"]["kl"] for layer in layers]}
    settings = analysis["settings"]
    return greedy_recipe(sensitivity, settings["format"], settings["upgrade"], budget, kl_budget, center_k)
