"""fp4kv inspect: conventions from producer metadata (or ambiguous), round trips from export,
and every hazard that makes an engine silently mis-scale the KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_loaders.fixtures import K_AMAX, V_AMAX, close, save_llama, scales_dict, write_scales
from safetensors.torch import save_file
from typer.testing import CliRunner

from fp4kv_cli.cli import app
from fp4kv_cli.export.inspect import inspect_path
from fp4kv_cli.export.plan import MATCH_RTOL

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama") / "model")


def checkpoint(
    base: Path,
    folder: Path,
    tensors: dict[str, float | list[float]],
    hf_quant: dict | None = None,
    quantization_config: dict | None = None,
    indexed: bool = True,
    list_kv: bool = True,
) -> Path:
    """A copy of ``base`` plus KV tensors in an extra shard; with ``indexed`` a new index lists
    the weights and (if ``list_kv``) the KV shard."""
    folder.mkdir()
    for path in base.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    if tensors:
        save_file(
            {k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()},
            str(folder / "kv.safetensors"),
        )
    if indexed:
        from safetensors import safe_open

        with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
            weight_map = {k: "model.safetensors" for k in list(handle.keys())}
        if list_kv:
            weight_map.update({k: "kv.safetensors" for k in tensors})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    if hf_quant is not None:
        (folder / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    if quantization_config is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def modelopt_scales(divisor: float) -> dict[str, float]:
    tensors = {}
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_proj.k_scale"] = K_AMAX[i] / divisor
        tensors[f"model.layers.{i}.self_attn.v_proj.v_scale"] = V_AMAX[i] / divisor
    return tensors


def modelopt(version: str, kv: str = "NVFP4") -> dict:
    return {
        "producer": {"name": "modelopt", "version": version},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": kv},
    }


def has(report: dict, needle: str) -> bool:
    return any(needle in hazard for hazard in report["hazards"])


@pytest.mark.parametrize(
    ("version", "divisor", "convention"),
    [
        ("0.40.0", 2688.0, "6x448"),
        ("0.42.0", 448.0, "448"),
        ("0.44.1", 448.0, "448"),
        ("0.41.0", 448.0, None),
    ],
)
def test_producer_version_decides_nvfp4_convention(
    llama: Path, tmp_path: Path, version: str, divisor: float, convention: str | None
) -> None:
    ckpt = checkpoint(llama, tmp_path / "c", modelopt_scales(divisor), hf_quant=modelopt(version))
    report = inspect_path(ckpt)
    assert report["convention"] == convention
    for row, k_amax in zip(report["layers"], K_AMAX):
        assert close(row["readings"]["k"]["448" if divisor == 448.0 else "6x448"], k_amax)
        if convention is not None:
            assert close(row["k_amax"], k_amax)
    if convention == "448":  # SGLang assumes amax / 2688: 6x too wide, not an overflow
        assert has(report, "sglang sm100") and has(report, "range wasted") and not has(report, "OVERFLOW")
    if convention == "6x448":  # TRT-LLM reads amax / 448: values above amax / 6 overflow
        assert has(report, "trtllm sm100") and has(report, "OVERFLOW")
    if convention is None:  # ambiguous: both readings, each with the consumer it would break
        assert "ambiguous" in report["basis"] and has(report, "if 448:") and has(report, "if 6x448:")


def test_fp8_hazards_missing_all_ones_and_clamp(llama: Path, tmp_path: Path) -> None:
    ones = {k: 1.0 for k in modelopt_scales(448.0)}
    report = inspect_path(checkpoint(llama, tmp_path / "ones", ones, hf_quant=modelopt("0.45.0", "FP8")))
    assert report["convention"] == "448" and has(report, "every KV scale is 1.0")
    clamped = dict(modelopt_scales(448.0))
    clamped["model.layers.0.self_attn.v_proj.v_scale"] = 1.0
    report = inspect_path(checkpoint(llama, tmp_path / "clamp", clamped, hf_quant=modelopt("0.42.0", "FP8")))
    assert has(report, "clamps FP8 KV scales")
    partial = {k: v for k, v in modelopt_scales(448.0).items() if "layers.1.self_attn.v_proj" not in k}
    report = inspect_path(
        checkpoint(llama, tmp_path / "partial", partial, hf_quant=modelopt("0.45.0", "FP8"))
    )
    assert has(report, "layer 1 has no V scale")


def test_missing_scales_and_missing_config(llama: Path, tmp_path: Path) -> None:
    report = inspect_path(llama)
    assert has(report, "has no KV scales") and report["convention"] is None
    report = inspect_path(
        checkpoint(llama, tmp_path / "declared", {}, hf_quant=modelopt("0.45.0", "FP8"), indexed=False)
    )
    assert has(report, "declares KV quantization but has no KV scales")
    report = inspect_path(checkpoint(llama, tmp_path / "noconfig", modelopt_scales(448.0)))
    assert has(report, "no KV quantization config") and report["convention"] is None


def test_legacy_and_compressed_tensors_names(llama: Path, tmp_path: Path) -> None:
    legacy = {f"model.layers.{i}.self_attn.kv_scale": K_AMAX[i] / 448 for i in range(2)}
    report = inspect_path(checkpoint(llama, tmp_path / "legacy", legacy))
    assert report["convention"] == "448" and close(report["layers"][1]["v_amax"], K_AMAX[1])
    old_ct = {
        f"model.layers.{i}.self_attn.{s}_proj.output_scale": K_AMAX[i] / 448 for i in range(2) for s in "kv"
    }
    scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    report = inspect_path(
        checkpoint(
            llama,
            tmp_path / "ct",
            old_ct,
            quantization_config={"quant_method": "compressed-tensors", "kv_cache_scheme": scheme},
        )
    )
    assert (
        report["convention"] == "448"
        and report["layers"][0]["k_family"] == "compressed-tensors (output_scale)"
    )


def test_implausible_per_head_offset_and_unindexed_hazards(llama: Path, tmp_path: Path) -> None:
    tiny = {k: 1e-9 for k in modelopt_scales(448.0)}
    report = inspect_path(checkpoint(llama, tmp_path / "tiny", tiny, hf_quant=modelopt("0.45.0", "FP8")))
    assert has(report, "implausible amax")
    per_head = dict(modelopt_scales(448.0))
    per_head["model.layers.0.self_attn.k_proj.k_scale"] = [0.01, 0.02]
    report = inspect_path(checkpoint(llama, tmp_path / "ph", per_head, hf_quant=modelopt("0.45.0", "FP8")))
    assert has(report, "per-tensor scales only")
    offset = dict(modelopt_scales(448.0))
    offset["model.layers.0.self_attn.k_proj.k_offset"] = [[0.5] * 16] * 2
    report = inspect_path(checkpoint(llama, tmp_path / "off", offset, hf_quant=modelopt("0.45.0", "FP8")))
    assert has(report, "k_proj.k_offset is indexed")
    no_index = checkpoint(
        llama, tmp_path / "noidx", modelopt_scales(448.0), hf_quant=modelopt("0.45.0", "FP8"), indexed=False
    )
    assert inspect_path(no_index)["layers"][0]["k_scale"] is not None  # no index: engines load every file
    unlisted = checkpoint(
        llama, tmp_path / "unl", modelopt_scales(448.0), hf_quant=modelopt("0.45.0", "FP8"), list_kv=False
    )
    report = inspect_path(unlisted)
    assert report["layers"][0]["k_scale"] is None and has(report, "which the index does not list")


@pytest.mark.parametrize("fmt", ["modelopt", "compressed-tensors", "json"])
def test_export_then_inspect_gives_the_calibrated_amax_back(llama: Path, tmp_path: Path, fmt: str) -> None:
    scales = write_scales(tmp_path / "scales.json", scales_dict(llama, per_head=True))
    out = tmp_path / ("out.json" if fmt == "json" else "out")
    kv = (
        ("--kv-dtype", "fp8") if fmt == "compressed-tensors" else ("--kv-dtype", "nvfp4", "--target", "sm120")
    )
    result = runner.invoke(
        app,
        ["export-scales", str(scales), "--model-dir", str(llama), "--out", str(out), "--format", fmt, *kv],
    )
    assert result.exit_code == 0, result.output
    report = inspect_path(out)
    assert [r["k_amax"] for r in report["layers"]] == pytest.approx(list(K_AMAX[:2]), rel=MATCH_RTOL)
    assert [r["v_amax"] for r in report["layers"]] == pytest.approx(list(V_AMAX[:2]), rel=MATCH_RTOL)


def test_centered_k_round_trip_and_unindexed_offset(llama: Path, tmp_path: Path) -> None:
    data = scales_dict(llama, offset=True)
    scales = write_scales(tmp_path / "scales.json", data)
    out = tmp_path / "out"
    args = [
        "export-scales",
        str(scales),
        "--model-dir",
        str(llama),
        "--out",
        str(out),
        "--format",
        "modelopt",
        "--kv-dtype",
        "nvfp4",
        "--target",
        "sm100",
    ]
    assert runner.invoke(app, args).exit_code == 0
    report = inspect_path(out)
    assert [r["k_amax"] for r in report["layers"]] == pytest.approx(
        [e["k_amax_raw"] for e in data["layers"]], rel=MATCH_RTOL
    )
    assert [r["k_amax_centered"] for r in report["layers"]] == pytest.approx(list(K_AMAX[:2]))
    assert has(report, "not indexed): engines ignore it")


def test_scales_file_and_cli_json(llama: Path, tmp_path: Path) -> None:
    scales = write_scales(tmp_path / "scales.json", scales_dict(llama))
    report = inspect_path(scales)
    assert report["layers"][0]["k_scale"]["6x448"] == pytest.approx(K_AMAX[0] / 2688)
    saved = tmp_path / "report.json"
    result = runner.invoke(app, ["inspect", str(scales), "--json", str(saved)])
    assert result.exit_code == 0 and json.loads(saved.read_text())["kind"] == "scales"
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and result.output.startswith("error:")
