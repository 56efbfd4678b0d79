"""Mixed K/V formats per layer: cache bytes and accounting, recipes in the scales file, and
``fp4kv eval gsm8k --kv-dtype recipe``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from typer.testing import CliRunner

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.cli import app
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.runner import cache_factory, parse_kv_dtypes
from fp4kv_cli.quant import reference
from fp4kv_cli.quant.methods import BF16KVMethod
from fp4kv_cli.quant.registry import get_kv_cache_method
from fp4kv_cli.quant.scales import ScalesFileError, parse_scales
from fp4kv_cli.quant.storage import KVStorage, LayerStorage, kv_method

B, H, D = 2, 2, 32
CONFIG = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=H,
                     head_dim=D, vocab_size=32)  # fmt: skip
cli = CliRunner()


def _storage(
    k_methods: list, v_methods: list, k_scales: list | None = None, v_scales: list | None = None
) -> KVStorage:
    k_scales = k_scales or [None] * len(k_methods)
    v_scales = v_scales or [None] * len(k_methods)
    return KVStorage(tuple(LayerStorage(*layer) for layer in zip(k_methods, v_methods, k_scales, v_scales)))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B * T * H, D]`` in slot order (row b, position t, head h)."""
    return x.transpose(1, 2).reshape(-1, x.shape[-1])


def _slots(buffer: torch.Tensor, capacity: int, tokens: int) -> torch.Tensor:
    return buffer.view(B, capacity, H, -1)[:, :tokens].reshape(B * tokens * H, -1)


def test_mixed_cache_holds_each_formats_reference_bytes_and_accounts_them() -> None:
    nvfp4, fp8, blockfp4 = (get_kv_cache_method(n) for n in ("nvfp4", "fp8", "blockfp4"))
    bf16 = BF16KVMethod(torch.bfloat16)
    k_scale, v_scale = torch.tensor(0.002), torch.tensor(0.02)
    cache = QuantKVCache.from_storage(
        CONFIG, _storage([nvfp4, bf16], [fp8, blockfp4], [k_scale, None], [v_scale, None])
    )
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(B, H, 5, D, generator=g), 3 * torch.randn(B, H, 5, D, generator=g)) for _ in range(2)]
    step = [(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)) for _ in range(2)]
    for layer in range(2):
        cache.update(*kv[layer], layer)
    read = [cache.update(*step[layer], layer) for layer in range(2)]
    full = [[_rows(torch.cat([a, b], dim=2)) for a, b in zip(kv[i], step[i])] for i in range(2)]
    first, second = cache.layers
    packed, scales = reference.nvfp4_quantize_reference(full[0][0], k_scale)
    assert torch.equal(_slots(first.buffers.k, first.capacity, 6), packed)
    assert torch.equal(_slots(first.buffers.k_scale, first.capacity, 6), scales)
    assert torch.equal(
        _rows(read[0][0]), reference.nvfp4_dequantize_reference(packed, scales, k_scale, torch.float32)
    )
    fp8_bytes = reference.fp8_quantize_reference(full[0][1], v_scale)
    assert first.buffers.v_scale is None
    assert torch.equal(
        _slots(first.buffers.v, first.capacity, 6).view(torch.uint8), fp8_bytes.view(torch.uint8)
    )
    assert torch.equal(_slots(second.buffers.k, second.capacity, 6), full[1][0].bfloat16())
    packed, scales = reference.blockfp4_quantize_reference(full[1][1])
    assert torch.equal(_slots(second.buffers.v, second.capacity, 6), packed)
    assert torch.equal(_slots(second.buffers.v_scale, second.capacity, 6), scales)
    cells = [m.compute_cell_size(H, D, 1, 1) for m in (nvfp4, fp8, bf16, blockfp4)]
    assert cells == [H * (D // 2 + D // 16), H * D, 2 * H * D, H * (D // 2 + D // 16)]
    assert cache.bytes_per_token() == sum(cells)
    assert cache.stored_bytes() == sum(cells) * B * 6
    assert cache.capacity_bytes() == sum(cells) * B * first.capacity


def test_dynamic_scales_are_per_tensor_and_survive_reset() -> None:
    nvfp4, bf16 = get_kv_cache_method("nvfp4"), BF16KVMethod(torch.float32)
    cache = QuantKVCache.from_storage(
        CONFIG, _storage([nvfp4, bf16], [bf16, nvfp4], None, [None, torch.tensor(0.5)])
    )
    k, v = torch.randn(B, H, 4, D), 2 * torch.randn(B, H, 4, D)
    for layer in range(2):
        cache.update(k, v, layer)
    k_scales, v_scales = cache.layer_scales()
    assert k_scales[0] == pytest.approx(float(k.abs().max()) / (6 * 448), rel=1e-6)
    assert torch.isnan(torch.tensor([v_scales[0], k_scales[1]])).all() and v_scales[1] == 0.5
    cache.layers[1].reset()
    assert cache.layers[1].v_scale == 0.5  # a calibrated scale is kept


def test_storage_rejects_wrong_layer_counts() -> None:
    nvfp4 = get_kv_cache_method("nvfp4")
    with pytest.raises(FP4KVError, match="storage has 1 layers but the model has 2"):
        QuantKVCache.from_storage(CONFIG, KVStorage.uniform(nvfp4, 1))
    with pytest.raises(FP4KVError, match="storage has 1 layers but 2 V formats"):
        KVStorage.build([nvfp4], [nvfp4, nvfp4])


def test_storage_takes_each_layers_scale_from_its_own_method() -> None:
    methods = [kv_method(name, torch.float32) for name in ("nvfp4", "bf16", "fp8", "blockfp4")]
    storage = KVStorage.build(methods[:2], methods[2:], [2.0, 3.0], [4.0, 5.0])
    first, second = storage.layers
    assert float(first.k_scale) == pytest.approx(2.0 / 2688) and float(first.v_scale) == pytest.approx(
        4 / 448
    )
    assert second.k_scale is None and second.v_scale is None
    assert [(layer.k_method.name, layer.v_method.name) for layer in storage.layers] == [
        ("nvfp4", "fp8"),
        ("bf16", "blockfp4"),
    ]


def test_cache_factory_builds_each_kv_dtype_as_the_eval_does() -> None:
    scales_file = parse_scales(_scales([("nvfp4", "fp8"), ("bf16", "blockfp4")]))
    offsets = torch.randn(2, H, D)
    make_cache = cache_factory(CONFIG, ("nvfp4", "recipe"), scales_file, offsets, torch.float32, "cpu")
    reference_layer = make_cache("bf16", 8).layers[0]
    assert isinstance(reference_layer.k_method, BF16KVMethod) and reference_layer.k_offset is None
    nvfp4 = make_cache("nvfp4", 8).layers[1]
    assert float(nvfp4.k_scale) == pytest.approx(8 / 2688) and float(nvfp4.v_scale) == pytest.approx(4 / 2688)
    assert torch.equal(nvfp4.k_offset, offsets[1])
    recipe = make_cache("recipe", 8).layers
    formats = [(layer.k_method.name, layer.v_method.name) for layer in recipe]
    assert formats == [("nvfp4", "fp8"), ("bf16", "blockfp4")]
    assert float(recipe[0].v_scale) == pytest.approx(2 / 448) and torch.equal(recipe[1].k_offset, offsets[1])


def _scales(formats: list[tuple[str | None, str | None]]) -> dict:
    layers = [{"index": i, "k_amax": 4.0 * (i + 1), "v_amax": 2.0 * (i + 1)} for i in range(len(formats))]
    for layer, (k, v) in zip(layers, formats):
        layer.update({key: value for key, value in (("k_format", k), ("v_format", v)) if value is not None})
    return {"schema": "fp4kv.scales", "version": 1, "layers": layers}


def test_scales_file_recipe_parsing() -> None:
    assert parse_scales(_scales([(None, None), (None, None)])).recipe() is None
    parsed = parse_scales(_scales([("NVFP4", "fp8"), ("bf16", "blockfp4")]))
    assert parsed.recipe() == (["nvfp4", "bf16"], ["fp8", "blockfp4"])
    assert parsed.layers[0].k_format == "nvfp4"
    with pytest.raises(ScalesFileError, match="layer 1 v_format is 'fp5'; use one of bf16, fp8"):
        parse_scales(_scales([("nvfp4", "fp8"), ("bf16", "fp5")]))
    with pytest.raises(ScalesFileError, match="for some layers or tensors only"):
        parse_scales(_scales([("nvfp4", "fp8"), (None, None)]))


def test_parse_kv_dtypes_knows_recipe() -> None:
    assert parse_kv_dtypes("bf16, Recipe,bf16") == ("bf16", "recipe")
    with pytest.raises(
        FP4KVError,
        match="unknown KV cache dtype 'mxfp4'; known: bf16, fp8, nvfp4, nvfp4_4over6, blockfp4, recipe",
    ):
        parse_kv_dtypes("bf16,mxfp4")


EVAL = ["--limit", "1", "--num-fewshot", "1", "--max-new-tokens", "4", "--fidelity-samples", "1",
        "--device", "cpu"]  # fmt: skip


def test_eval_recipe_runs_the_files_formats(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(_scales([("nvfp4", "fp8"), ("bf16", "blockfp4")])))
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--scales", str(path), "--kv-dtype", "recipe",
            "--out", str(tmp_path), "--run-name", "r", *EVAL]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())["results"]["recipe"]
    # 2 KV heads x head_dim 16: nvfp4 K 2 * 9, fp8 V 2 * 16, K "bf16" stored as bf16 even though
    # the model computes in fp32, 2 * 32, blockfp4 V 2 * 9 bytes.
    assert summary["kv_bytes_per_token"] == 18 + 32 + 64 + 18
    assert summary["scale_source"] == "calibrated" and summary["fidelity"]["kl"] > 0


def test_eval_recipe_needs_formats_in_the_scales_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "scales.json"
    path.write_text(json.dumps(_scales([(None, None), (None, None)])))
    for scales in (["--scales", str(path)], []):
        args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), *scales, "--kv-dtype", "bf16,recipe",
                "--out", str(tmp_path), *EVAL]  # fmt: skip
        result = cli.invoke(app, args)
        assert result.exit_code == 2
        expected = (
            "error: --kv-dtype recipe needs --scales with per-layer k_format/v_format; "
            "write one with fp4kv analyze --write-recipe"
        )
        assert result.output.strip().splitlines() == [expected]


REPO = Path(__file__).resolve().parent.parent


def test_recipe_command_replans_the_saved_analysis(tmp_path: Path) -> None:
    """`fp4kv recipe` on the 0.5B's saved analysis rebuilds the recipe file analyze wrote (same
    budgets), and a stricter --kl-budget / a larger --budget change the pick as greedy_recipe says."""
    runs = REPO / "docs" / "runs"
    analysis, scales = runs / "q05-analysis.json", runs / "q05.ck.scales.json"
    args = ["recipe", "--analysis", str(analysis), "--scales", str(scales)]
    same = tmp_path / "same.json"
    result = cli.invoke(app, [*args, "--write-recipe", str(same)])
    assert result.exit_code == 0, result.output
    assert json.loads(same.read_text()) == json.loads((runs / "q05.recipe.scales.json").read_text())
    wider = tmp_path / "wider.json"
    assert cli.invoke(app, [*args, "--budget", "0.61", "--write-recipe", str(wider)]).exit_code == 0
    k_formats = [layer["k_format"] for layer in json.loads(wider.read_text())["layers"]]
    assert [i for i, f in enumerate(k_formats) if f == "fp8"] == [9, 10, 13, 14, 16]  # + layer 14 (KL 0.0019)
    loose = tmp_path / "loose.json"
    result = cli.invoke(app, [*args, "--kl-budget", "0.01", "--write-recipe", str(loose)])
    assert result.exit_code == 0 and "every K and V stays" in result.output
    assert {layer["k_format"] for layer in json.loads(loose.read_text())["layers"]} == {"nvfp4"}


def test_recipe_command_bad_input_is_one_line(tmp_path: Path) -> None:
    runs = REPO / "docs" / "runs"
    analysis, centered = runs / "q05-analysis.json", runs / "q05.ck.scales.json"
    plain = runs / "q05.scales.json"
    smol = runs / "smol.ck.scales.json"
    out = tmp_path / "r.json"
    cases = [
        ([str(tmp_path / "none.json"), centered], "does not exist; make one with fp4kv analyze"),
        ([analysis, plain], "has no k_offset; pass the --center-k scales file"),
        ([analysis, smol], "the analysis has 24 layers but the scales file 30"),
        ([centered, centered], "is not an fp4kv analysis.json"),
    ]
    for (source, scales), message in cases:
        result = cli.invoke(app, ["recipe", "--analysis", str(source), "--scales", str(scales),
                                  "--write-recipe", str(out)])  # fmt: skip
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert message in result.output
    assert not out.exists()
    result = cli.invoke(app, ["recipe", "--analysis", str(analysis), "--scales", str(centered),
                              "--write-recipe", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and "is a folder" in result.output
