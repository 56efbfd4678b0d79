"""SGLang's own config parsing and KV scale loading (``sglang_probe.py``, one subprocess for all
checkpoints) on what ``fp4kv export-scales`` writes: each layer gets the value the export report
says SGLang hands to its kernel."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from engines.engine_exports import ARCHS, KINDS, LAYERS, MODELOPT_KV_ONLY, Export
from engine_loaders.fixtures import K_AMAX, V_AMAX, scales_dict, write_scales
from safetensors.torch import save_file

from fp4kv_cli.export.exporter import OFFSET_FILE
from fp4kv_cli.export.plan import MATCH_RTOL

if importlib.util.find_spec("sglang") is None:
    pytest.skip("real-engine tier: bash scripts/install_engines.sh installs sglang", allow_module_level=True)

PROBE = Path(__file__).with_name("sglang_probe.py")
#: NVFP4 exports: id -> (export-scales options, the kernel's divisor of the used value, sm)
NVFP4 = {
    "nvfp4-sm100": (("--target", "sm100"), 448.0, 100),
    "nvfp4-sm120": (("--target", "sm120"), 2688.0, 120),
    # 448 written although SGLang sm100 multiplies by 6: the x6 shows in engine and report
    "nvfp4-sm100-forced-448": (
        ("--target", "sm100", "--convention", "448", "--force-convention"),
        448.0,
        100,
    ),
}


def _request(exported_id: str, path: Path, model_type: str, **extra: Any) -> dict[str, Any]:
    return {"id": exported_id, "path": str(path), "num_layers": LAYERS, "model_type": model_type, **extra}


def _nvfp4_export(model: Path, scales: Path, out: Path, *args: str) -> dict[str, Any]:
    from typer.testing import CliRunner

    from fp4kv_cli.cli import app

    result = CliRunner().invoke(
        app,
        [
            "export-scales",
            str(scales),
            "--model-dir",
            str(model),
            "--out",
            str(out),
            "--kv-dtype",
            "nvfp4",
            "--format",
            "modelopt",
            *args,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "fp4kv_kv_scales.json").read_text())


@pytest.fixture(scope="module")
def probed(
    exports: dict[str, Export], models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Every checkpoint below through SGLang in one process: id -> (result, export report)."""
    root = tmp_path_factory.mktemp("sglang")
    requests, reports = [], {}
    for key, exported in exports.items():
        requests.append(_request(key, exported.path, exported.arch))
        reports[key] = exported.report
    llama = models["llama"]
    scales = write_scales(root / "scales.json", scales_dict(llama, per_head=True))
    for key, (args, _, sm) in NVFP4.items():
        reports[key] = _nvfp4_export(llama, scales, root / key, *args)
        requests.append(
            _request(key, root / key, "llama", quantization="modelopt_fp4", kv_cache_dtype="nvfp4", sm=sm)
        )
    # K offset: scales cover raw K; listed in the index, SGLang's loop skips qkv_proj.k_offset
    offset_scales = write_scales(root / "offset.json", scales_dict(llama, offset=True))
    reports["offset"] = _nvfp4_export(llama, offset_scales, root / "offset", "--target", "sm100")
    requests.append(_request("offset", root / "offset", "llama", kv_cache_dtype="nvfp4", sm=100))
    indexed = root / "offset-indexed"
    shutil.copytree(root / "offset", indexed)
    index = json.loads((indexed / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.k_proj.k_offset"] = OFFSET_FILE
    (indexed / "model.safetensors.index.json").write_text(json.dumps(index))
    reports["offset-indexed"] = reports["offset"]
    requests.append(_request("offset-indexed", indexed, "llama", kv_cache_dtype="nvfp4", sm=100))
    # ModelOpt's own KV-only export (quant_algo null): no quant config, scales dropped
    kv_only = root / "kv-only"
    shutil.copytree(models["llama-modelopt"], kv_only)
    save_file(
        {
            f"model.layers.{i}.self_attn.{s}_proj.{s}_scale": torch.tensor(0.05)
            for i in range(LAYERS)
            for s in "kv"
        },
        str(kv_only / "kv.safetensors"),
    )
    requests.append(_request("kv-only", kv_only, "llama"))
    reports["kv-only"] = {}
    # FP8 JSON sidecar as --quantization-param-path
    sidecar = root / "kv.json"
    from typer.testing import CliRunner

    from fp4kv_cli.cli import app

    result = CliRunner().invoke(
        app,
        [
            "export-scales",
            str(scales),
            "--model-dir",
            str(llama),
            "--out",
            str(sidecar),
            "--kv-dtype",
            "fp8",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    reports["param-path"] = json.loads(sidecar.read_text())
    requests.append(_request("param-path", llama, "llama", param_path=str(sidecar)))
    (root / "requests.json").write_text(json.dumps(requests))
    done = subprocess.run(
        [sys.executable, str(PROBE), str(root / "requests.json"), str(root / "results.json")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
    return {key: (results[key], reports[key]) for key in results}


def sglang_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    (found,) = [c for c in report["consumers"] if c["engine"] == "sglang"]
    return found["layers"]


def ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result.get("trace")
    return result


@pytest.mark.parametrize("key", [f"{a}-{k}" for a in ARCHS for k in KINDS])
def test_fp8_exports_load_the_reported_scales(probed: dict[str, Any], key: str) -> None:
    result, report = probed[key]
    ok(result)
    rows = sglang_rows(report)
    assert result["scales"] == [[row["k_used"], row["v_used"]] for row in rows]
    # every Linear stays unquantized (the export's exclusions / empty config_groups)
    assert set(result["linear_methods"].values()) == {"UnquantizedLinearMethod"}
    if key.startswith("qwen2"):
        # SGLang's Qwen2 loader never remaps k/v scale names: dropped, 1.0, as the report says
        assert result["scales"] == [[1.0, 1.0]] * LAYERS and not any(r["k_verdict"] == "ok" for r in rows)
    elif key.endswith("ct-head"):
        # SGLang takes only static per-tensor FP8 compressed-tensors KV schemes: 1.0, as reported
        assert result["attention_method"] is None and not any(r["k_verdict"] == "ok" for r in rows)
    elif "ct-" in key:
        assert (result["quantization"], result["attention_method"]) == (
            "compressed-tensors",
            "CompressedTensorsKVCacheMethod",
        )
    else:
        assert (result["quantization"], result["attention_method"]) == (
            "modelopt_fp8",
            "ModelOptFp8KVCacheMethod",
        )
        assert all(r["k_verdict"] == r["v_verdict"] == "ok" for r in rows)


@pytest.mark.parametrize("key", list(NVFP4))
def test_nvfp4_modelopt_gets_what_its_kernel_expects(probed: dict[str, Any], key: str) -> None:
    result, report = ok(probed[key][0]), probed[key][1]
    _, divisor, _ = NVFP4[key]
    assert result["quant_config"] == "ModelOptFp4Config"
    assert result["scales"] == [[row["k_used"], row["v_used"]] for row in sglang_rows(report)]
    factor = 6.0 if key.endswith("forced-448") else 1.0
    for (k, v), k_amax, v_amax in zip(result["scales"], K_AMAX, V_AMAX):
        assert k * divisor == pytest.approx(factor * k_amax, rel=MATCH_RTOL)
        assert v * divisor == pytest.approx(factor * v_amax, rel=MATCH_RTOL)
    verdict = "wastes x6" if factor == 6.0 else "ok"
    assert sglang_rows(report)[0]["k_verdict"].startswith(verdict)  # x6.01: bf16 rounding up


def test_k_offset_scale_covers_raw_k_and_an_indexed_offset_is_skipped(probed: dict[str, Any]) -> None:
    result, report = ok(probed["offset"][0]), probed["offset"][1]
    raw = [layer["k_amax"] for layer in report["layers"]]
    assert all(layer["k_amax_centered"] < layer["k_amax"] for layer in report["layers"])
    assert [k * 448 for k, _ in result["scales"]] == pytest.approx(raw, rel=MATCH_RTOL)
    # SGLang's loop maps k_proj.k_offset onto qkv_proj.k_offset, finds no such parameter and skips
    # it (vLLM refuses it: tests/engines/test_vllm_engine.py).
    assert ok(probed["offset-indexed"][0])["scales"] == result["scales"]


def test_modelopt_kv_only_config_drops_the_scales(probed: dict[str, Any]) -> None:
    result = ok(probed["kv-only"][0])
    assert MODELOPT_KV_ONLY["quantization"]["quant_algo"] is None
    assert result["quantization"] is None and result["attention_method"] is None
    assert result["scales"] == [[1.0, 1.0]] * LAYERS


def test_json_sidecar_is_a_param_path(probed: dict[str, Any]) -> None:
    result, report = ok(probed["param-path"][0]), probed["param-path"][1]
    rows = sglang_rows(report)
    assert result["param_path_scales"] == [[i, row["k_used"]] for i, row in enumerate(rows)]
    assert all(row["k_used"] == row["v_used"] for row in rows)
    assert result["param_path_scales"][1][1] * 448 == pytest.approx(max(K_AMAX[1], V_AMAX[1]), rel=MATCH_RTOL)
