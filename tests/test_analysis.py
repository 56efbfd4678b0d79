"""``fp4kv analyze`` end to end on the tiny Qwen2, and the analysis building blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp4kv_cli.analysis.round_trip import HeadSubsetMethod, round_trip
from fp4kv_cli.calibration import calibrate
from fp4kv_cli.cli import app
from fp4kv_cli.models import load_model_and_tokenizer
from fp4kv_cli.quant.registry import get_kv_cache_method
from fp4kv_cli.quant.scales import load_scales_file

cli = CliRunner()
TEXTS = ["Question: Tom has 3 apples and buys 5 more. How many? Answer: 8 #### 8"] * 3


@pytest.fixture(scope="module")
def qwen2_scales(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """K-centered scales.json of the tiny Qwen2 (k_proj bias, so the offsets are real)."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_qwen2_dir), "cpu", torch.float32)
    data = calibrate(model, tokenizer, TEXTS, seq_len=48, batch_size=3, per_head=True, center_k=True,
                     model_id=str(tiny_qwen2_dir))  # fmt: skip
    path = tmp_path_factory.mktemp("scales") / "scales.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", ["nvfp4", "blockfp4", "fp8"])
def test_head_subset_of_all_heads_is_the_base_read_back(name: str) -> None:
    x = torch.randn(7, 3, 32, generator=torch.Generator().manual_seed(0)) * 4
    base = get_kv_cache_method(name)
    scale = torch.tensor(0.01) if base.uses_tensor_scale else None
    expected = round_trip(base, x, scale)
    got = round_trip(HeadSubsetMethod(base, None, torch.float32), x, scale)
    assert torch.equal(got, expected)
    one = round_trip(HeadSubsetMethod(base, [1], torch.float32), x, scale)
    assert torch.equal(one[:, 1], expected[:, 1]) and torch.equal(one[:, [0, 2]], x[:, [0, 2]])


def test_analyze_end_to_end_writes_a_recipe_eval_runs(
    tiny_qwen2_dir: Path, qwen2_scales: Path, tmp_path: Path
) -> None:
    out, recipe_path = tmp_path / "analysis", tmp_path / "recipe.json"
    args = ["analyze", "--model", str(tiny_qwen2_dir), "--scales", str(qwen2_scales), "--samples", "1",
            "--budget", "0.7", "--kl-budget", "0", "--device", "cpu", "--out", str(out),
            "--write-recipe", str(recipe_path)]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "recipe validation" in result.output
    analysis = json.loads((out / "analysis.json").read_text())
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    layers = analysis["layers"]
    assert len(layers) == 3 and all(len(layer["k_heads"]) == 2 for layer in layers)
    assert all(layer["k_centered"] is not None for layer in layers)
    assert all(layer["v"]["kl"] > 0 and 0 < layer["v"]["top1"] <= 1 for layer in layers)
    recipe = analysis["recipe"]
    # nvfp4 is 0.5625 B/elem, fp8 1.0; 6 tensors: a 0.7 budget allows exactly one upgrade,
    # given to the tensor with the largest lone KL (K measured centered).
    assert recipe["bytes_per_element"] == pytest.approx((5 * 0.5625 + 1.0) / 6)
    lone = {(kind, i): layer[key]["kl"] for i, layer in enumerate(layers)
            for kind, key in (("k", "k_centered"), ("v", "v"))}  # fmt: skip
    kind, worst = max(lone, key=lone.get)
    assert [(k, i) for k in ("k", "v") for i, f in enumerate(recipe[k]) if f == "fp8"] == [(kind, worst)]
    validation = analysis["validation"]
    assert list(validation) == ["recipe", "all-nvfp4", "all-fp8"]
    # head_dim 32, 2 KV heads, 3 layers: nvfp4 K or V = 2 * (16 + 2) B, fp8 = 2 * 32 B per layer.
    assert validation["all-nvfp4"]["kv_bytes_per_token"] == 3 * 2 * 36
    assert validation["recipe"]["kv_bytes_per_token"] == 5 * 36 + 64
    assert validation["all-fp8"]["kl"] < validation["all-nvfp4"]["kl"]
    parsed = load_scales_file(recipe_path)
    assert parsed.recipe() == (recipe["k"], recipe["v"])
    run = cli.invoke(app, ["eval", "gsm8k", "--model", str(tiny_qwen2_dir), "--scales", str(recipe_path),
                           "--kv-dtype", "bf16,recipe", "--limit", "2", "--num-fewshot", "1",
                           "--max-new-tokens", "4", "--fidelity-samples", "1", "--device", "cpu",
                           "--out", str(tmp_path / "eval"), "--run-name", "r"])  # fmt: skip
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "eval" / "r" / "summary.json").read_text())
    assert summary["results"]["recipe"]["kv_bytes_per_token"] == 5 * 36 + 64
    assert summary["results"]["recipe"]["recipe"] == {"k": recipe["k"], "v": recipe["v"]}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--format", "nvfp5"], "unknown KV cache dtype 'nvfp5'"),
        (["--upgrade", "nvfp4"], "--upgrade must differ from --format"),
        (["--samples", "0"], "--samples must be > 0"),
        (["--budget", "0.5"], "over the budget 0.5"),
    ],
)
def test_analyze_bad_input_is_one_line(
    tiny_qwen2_dir: Path, qwen2_scales: Path, tmp_path: Path, extra: list[str], needle: str
) -> None:
    args = ["analyze", "--model", str(tiny_qwen2_dir), "--scales", str(qwen2_scales), "--samples", "1",
            "--no-per-head", "--device", "cpu", "--out", str(tmp_path), *extra]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert needle in result.output and len(result.output.strip().splitlines()) == 1
