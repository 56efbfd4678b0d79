"""K centering for engines without an engine: ``export-scales --k-centering plugin|modelopt``,
what ``inspect`` says about each, and the plugin's checks and subtraction (fp4kv_cli/serve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.export.exporter import K_BIAS_FILE, OFFSET_FILE, ExportRequest, export_scales
from fp4kv_cli.export.inspect import inspect_path
from fp4kv_cli.export.plan import stored
from fp4kv_cli.quant.scales import amax_to_scale
from fp4kv_cli.serve import centering
from tests.engine_loaders.fixtures import save_llama, scales_dict, write_scales


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def centered_scales(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scales") / "ck.scales.json"
    return write_scales(path, scales_dict(llama, per_head=True, offset=True))


def _export(scales: Path, llama: Path, out: Path, fmt: str, k_centering: str) -> dict:
    result = export_scales(
        ExportRequest(
            scales=scales,
            out=out,
            kv_dtype="fp8",
            fmt=fmt,
            model_dir=llama,
            engine="vllm",
            target="sm90",
            k_centering=k_centering,
        )
    )
    return result.report


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def test_plugin_export_writes_marker_offsets_and_centered_k_scales(
    llama: Path, centered_scales: Path, tmp_path: Path
) -> None:
    data = json.loads(centered_scales.read_text())
    out = tmp_path / "ck"
    report = _export(centered_scales, llama, out, "compressed-tensors", "plugin")
    config = json.loads((out / "config.json").read_text())
    entry = config[centering.MARKER]
    assert (entry["num_layers"], entry["num_kv_heads"], entry["head_dim"]) == (2, 2, 16)
    assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "attn_head"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(name.endswith("k_offset") for name in index)
    offsets = centering.load_offsets(out, entry)
    centering.check_offsets(offsets, 2, 2, 16)
    for i, layer in enumerate(data["layers"]):
        assert torch.equal(offsets.layers[i], torch.tensor(layer["k_offset"], dtype=torch.float32))
    scales = _tensors(out / "model-fp4kv-kv-scales.safetensors")
    k0 = scales["model.layers.0.self_attn.k_scale"]
    # K scales of centered K: the per-head centered amax, not amax + |offset|.
    expected = [stored(amax_to_scale(a, "448")) for a in data["layers"][0]["k_amax_per_head"]]
    assert k0.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert report["k_centering"] == "plugin"
    assert any("OVERFLOWS" in w and "fp4kv plugin" in w for w in report["warnings"])
    inspected = inspect_path(out)
    assert inspected["k_centering"]["needs_plugin"] is True
    ratio = data["layers"][1]["k_amax_raw"] / data["layers"][1]["k_amax"]
    assert inspected["k_centering"]["overflow_without"]["ratio"] == pytest.approx(
        max(layer["k_amax_raw"] / layer["k_amax"] for layer in data["layers"])
    )
    assert ratio > 1
    (hazard,) = [h for h in inspected["hazards"] if "fp4kv vLLM plugin" in h]
    assert "OVERFLOWS" in hazard and "clipped" in hazard


def test_default_export_keeps_raw_k_scales_and_no_marker(
    llama: Path, centered_scales: Path, tmp_path: Path
) -> None:
    out = tmp_path / "plain"
    _export(centered_scales, llama, out, "compressed-tensors", "none")
    config = json.loads((out / "config.json").read_text())
    assert centering.MARKER not in config and (out / OFFSET_FILE).is_file()
    inspected = inspect_path(out)
    assert inspected["k_centering"]["k_scales_cover"] == "raw K"
    assert not any("OVERFLOWS" in h for h in inspected["hazards"])


def test_modelopt_affine_naming(llama: Path, centered_scales: Path, tmp_path: Path) -> None:
    data = json.loads(centered_scales.read_text())
    out = tmp_path / "affine"
    _export(centered_scales, llama, out, "modelopt", "modelopt")
    biases = _tensors(out / K_BIAS_FILE)
    bias = biases["model.layers.1.self_attn.k_proj.k_bias"]
    # ModelOpt's _bias_value of HF key states [batch, heads, seq, head_dim], keepdim mean: K - bias stored.
    assert bias.shape == (1, 2, 1, 16) and bias.dtype == torch.float32
    assert torch.equal(bias[0, :, 0, :], torch.tensor(data["layers"][1]["k_offset"], dtype=torch.float32))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("k_bias" in name for name in index) and not (out / OFFSET_FILE).exists()
    assert centering.MARKER not in json.loads((out / "config.json").read_text())
    k_scale = _tensors(out / "model-fp4kv-kv-scales.safetensors")["model.layers.1.self_attn.k_proj.k_scale"]
    assert float(k_scale) == pytest.approx(stored(amax_to_scale(data["layers"][1]["k_amax"], "448")), rel=1e-6)
    inspected = inspect_path(out)
    assert inspected["k_centering"]["naming"].startswith("modelopt affine")
    assert any("no engine reads it" in h and "OVERFLOWS" in h for h in inspected["hazards"])


@pytest.mark.parametrize(
    ("fmt", "k_centering", "needle"),
    [
        ("json", "plugin", "writes into a model folder"),
        ("compressed-tensors", "modelopt", "use it with --format modelopt"),
        ("compressed-tensors", "sideways", "--k-centering"),
    ],
)
def test_bad_centering_requests(
    llama: Path, centered_scales: Path, tmp_path: Path, fmt: str, k_centering: str, needle: str
) -> None:
    with pytest.raises(FP4KVError, match=needle):
        _export(centered_scales, llama, tmp_path / "x", fmt, k_centering)
    assert not (tmp_path / "x").exists()


def test_centering_needs_offsets(llama: Path, tmp_path: Path) -> None:
    plain = write_scales(tmp_path / "s.json", scales_dict(llama, per_head=True))
    with pytest.raises(FP4KVError, match="calibrate --center-k"):
        _export(plain, llama, tmp_path / "x", "compressed-tensors", "plugin")


def test_offset_checks_are_one_line(tmp_path: Path) -> None:
    offsets = centering.Offsets(tmp_path, {0: torch.zeros(2, 16), 1: torch.zeros(2, 16)})
    centering.check_offsets(offsets, 2, 2, 16)
    for args, needle in (
        ((3, 2, 16), "for 2 layers .* the model has 3"),
        ((2, 4, 16), r"\[2, 16\] .* \[4, 16\]"),
        ((2, 2, 32), "kv heads x head_dim"),
    ):
        with pytest.raises(centering.CenteringError, match=needle) as err:
            centering.check_offsets(offsets, *args)
        assert "\n" not in str(err.value)
    with pytest.raises(centering.CenteringError, match="has no fp4kv-k-offset"):
        centering.load_offsets(tmp_path, {"file": OFFSET_FILE})


def test_center_key_and_rank_heads() -> None:
    offset = torch.randn(2, 8)
    key = (torch.randn(5, 16) * 4 + 50).to(torch.bfloat16)
    flat = centering.center_key(key, offset)
    assert flat.shape == key.shape and flat.dtype == torch.bfloat16
    expected = (key.float().view(5, 2, 8) - offset).to(torch.bfloat16).view(5, 16)
    assert torch.equal(flat, expected)
    assert torch.equal(centering.center_key(key.view(5, 2, 8), offset), expected.view(5, 2, 8))
    assert centering.rank_heads(8, 4, 1, 2) == [4, 5, 6, 7]
    assert centering.rank_heads(2, 1, 3, 4) == [1]
    assert centering.layer_index("model.layers.12.self_attn.attn") == 12
    assert centering.layer_index("lm_head") is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--engine", "sglang"], "--engine must be fp4kv or vllm"),
        (["--engine", "vllm", "--vllm-kv-dtype", "nvfp4"], "--vllm-kv-dtype must be one of"),
        (["--engine", "vllm", "--scales", "x.json"], "reads KV scales from the checkpoint"),
        (["--engine", "vllm", "--limit", "0"], "--limit must be > 0"),
        (["--paired-with", "runs/a"], "--paired-with is for --engine vllm"),
    ],
)
def test_engine_eval_bad_options_fail_in_one_line(
    llama: Path, tmp_path: Path, args: list[str], needle: str
) -> None:
    from typer.testing import CliRunner

    from fp4kv_cli.cli.app import app

    result = CliRunner().invoke(app, ["eval", "gsm8k", "-m", str(llama), "--out", str(tmp_path), *args])
    message = result.stderr.strip()
    assert result.exit_code == 2 and message.startswith("error:") and "\n" not in message, message
    assert needle in message, message
    assert not any(tmp_path.iterdir())
