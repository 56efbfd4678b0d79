"""FP8-weight checkpoints, quantized by the libraries that write them (compressed-tensors'
``float-quantized`` per-channel FP8 via scripts/make_fp8_checkpoint.py, transformers'
fine-grained block FP8), calibrate on the FP8
weights, evaluate, and take KV scales merged into their own quantization config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import load_script
from typer.testing import CliRunner

from fp4kv_cli.calibration.calibrate import calibrate
from fp4kv_cli.cli import app
from fp4kv_cli.export.inspect import inspect_path
from fp4kv_cli.models import load_model_and_tokenizer

pytest.importorskip("compressed_tensors")
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Numbers: 1 2 3 4 5 6 7 8 9 10", "short"]
cli = CliRunner()


def _finegrained_fp8(source: Path, out: Path, block: int = 16) -> Path:
    """``source`` with every decoder Linear weight in transformers' fine-grained FP8 (E4M3 with a
    ``weight_scale_inv`` per ``block x block`` tile), quantized by transformers' own ``Fp8Quantize``."""
    from types import SimpleNamespace

    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    shutil.copytree(source, out)
    config = FineGrainedFP8Config(weight_block_size=(block, block), modules_to_not_convert=["lm_head"])
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=config))
    weights = load_file(out / "model.safetensors")
    quantized: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        linear = name.startswith("model.layers.") and name.endswith("_proj.weight")
        quantized.update(
            quantize._quantize_one(name, tensor.to(torch.bfloat16)) if linear else {name: tensor}
        )
    save_file(
        {k: v.contiguous() for k, v in quantized.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    model_config = json.loads((out / "config.json").read_text())
    model_config["quantization_config"] = config.to_dict()
    (out / "config.json").write_text(json.dumps(model_config))
    return out


@pytest.fixture(scope="module", params=["compressed-tensors", "fine-grained"])
def fp8_dir(
    request: pytest.FixtureRequest, tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("fp8") / request.param
    build = (
        load_script("make_fp8_checkpoint").make_fp8_checkpoint
        if request.param == "compressed-tensors"
        else _finegrained_fp8
    )
    return build(tiny_qwen2_dir, out)


def test_fp8_checkpoint_calibrates_on_its_own_weights(fp8_dir: Path, tiny_qwen2_dir: Path) -> None:
    fp8, tokenizer = load_model_and_tokenizer(str(fp8_dir), "cpu", "bf16")
    dense, _ = load_model_and_tokenizer(str(tiny_qwen2_dir), "cpu", "bf16")
    assert json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    got = calibrate(fp8, tokenizer, TEXTS, seq_len=32, batch_size=2, center_k=True)
    expected = calibrate(dense, tokenizer, TEXTS, seq_len=32, batch_size=2, center_k=True)
    for g, e in zip(got["layers"], expected["layers"]):
        assert g["k_amax"] == pytest.approx(e["k_amax"], rel=0.1) and g["v_amax"] == pytest.approx(
            e["v_amax"], rel=0.1
        )
    # K/V of the FP8 weights, not of the source's bf16 ones
    assert [g["k_amax"] for g in got["layers"]] != [e["k_amax"] for e in expected["layers"]]


def test_fp8_checkpoint_evaluates_and_takes_kv_scales(fp8_dir: Path, tmp_path: Path) -> None:
    scales = tmp_path / "scales.json"
    result = cli.invoke(app, ["calibrate", "--model", str(fp8_dir), "--num-samples", "4", "--seq-len", "32",
                              "--batch-size", "2", "--per-head", "--out", str(scales)])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = cli.invoke(app, ["eval", "gsm8k", "--model", str(fp8_dir), "--scales", str(scales), "--kv-dtype",
                              "bf16,fp8", "--limit", "1", "--num-fewshot", "1", "--max-new-tokens", "4",
                              "--no-fidelity", "--out", str(tmp_path), "--run-name", "r"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "export"
    common = [
        "export-scales",
        str(scales),
        "--model-dir",
        str(fp8_dir),
        "--out",
        str(out),
        "--kv-dtype",
        "fp8",
    ]
    weights_config = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    if fp8_dir.name == "fine-grained":  # vLLM's / SGLang's Fp8Config: the config stays, the scales join
        result = cli.invoke(app, [*common, "--format", "modelopt"])
        assert result.exit_code == 2 and "already fp8-quantized; export --format fp8" in result.output
        result = cli.invoke(app, [*common[:-1], "nvfp4", "--format", "fp8"])
        assert result.exit_code == 2 and "--format modelopt" in result.output and not out.exists()
        result = cli.invoke(app, [*common, "--format", "fp8"])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["quantization_config"] == weights_config
        report = inspect_path(out)
        assert report["hazards"] == [] and report["convention"] == "448"
        reloaded, _ = load_model_and_tokenizer(str(out), "cpu", "bf16")  # transformers skips the KV scales
        source, _ = load_model_and_tokenizer(str(fp8_dir), "cpu", "bf16")
        assert all(
            torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), source.state_dict().values())
        )
    else:
        result = cli.invoke(app, [*common, "--format", "compressed-tensors"])
        assert result.exit_code == 0, result.output
        merged = json.loads((out / "config.json").read_text())["quantization_config"]
        assert merged["config_groups"] == weights_config["config_groups"] and merged["kv_cache_scheme"]
    original = load_file(next(fp8_dir.glob("*.safetensors")))
    exported = {}
    for shard in out.glob("*.safetensors"):
        exported.update(load_file(shard))
    for name, tensor in original.items():  # FP8 weights and their scales pass through unchanged
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert any(name.endswith("k_scale") for name in exported)
