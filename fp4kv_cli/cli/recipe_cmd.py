"""``fp4kv recipe``: a mixed-format recipe under another budget from a saved analysis (no model run)."""

from __future__ import annotations

from typing import Annotated

import typer

from fp4kv_cli.cli.app import WRITE_RECIPE_HELP, BudgetOption, KlBudgetOption, app, console, guarded


@app.command("recipe")
@guarded
def recipe(
    analysis: Annotated[str, typer.Option("--analysis", help="analysis.json written by fp4kv analyze.")],
    scales: Annotated[str, typer.Option("--scales", help="The scales file that analysis used.")],
    write_recipe: Annotated[str, typer.Option("--write-recipe", help=WRITE_RECIPE_HELP)],
    budget: BudgetOption = 0.6,
    kl_budget: KlBudgetOption = 0.001,
) -> None:
    """Re-plan fp4kv analyze's recipe under another --budget / --kl-budget from its saved lone KLs."""
    # heavy imports (torch, transformers) load here, not at import: ``--help`` stays fast
    from fp4kv_cli.analysis.recipe import check_recipe_path, write_recipe_file
    from fp4kv_cli.analysis.replan import load_analysis, replan
    from fp4kv_cli.quant.scales import load_scales_file

    check_recipe_path(write_recipe)
    scales_file = load_scales_file(scales)
    chosen = replan(load_analysis(analysis), scales_file, budget, kl_budget)
    write_recipe_file(write_recipe, scales_file, chosen)
    for note in chosen.notes or [
        "no tensor's lone KL exceeds --kl-budget: every K and V stays in the base format"
    ]:
        console.print(f"  {note}", highlight=False)
    console.print(
        f"{chosen.bytes_per_element:.4f} bytes per element; recipe written to {write_recipe} (not validated: "
        f"run fp4kv eval gsm8k --scales {write_recipe} --kv-dtype bf16,recipe)",
        highlight=False,
    )
