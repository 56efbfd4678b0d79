"""fp4kv export-scales: layout, conversion and links of every format, TensorRT-LLM's loader (a
re-implementation: TensorRT-LLM does not import on CPU); bad input fails in one line with nothing
written. Real vLLM and SGLang load the exports in tests/engines/."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from engine_loaders import trtllm
from engine_loaders.fixtures import (
    K_AMAX,
    V_AMAX,
    close,
    save_llama,
    save_qwen2_sharded,
    scales_dict,
    write_scales,
)
from safetensors import safe_open
from typer.testing import CliRunner

from fp4kv_cli.cli import app
from fp4kv_cli.export.exporter import OFFSET_FILE, SCALES_SHARD, ExportRequest, export_scales
from fp4kv_cli.export.inspect import inspect_path
from fp4kv_cli.export.plan import MATCH_RTOL

runner = CliRunner()
LAYERS = 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def scales(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scales(tmp_path_factory.mktemp("scales") / "scales.json", scales_dict(llama, per_head=True))


def run_export(scales: Path, model: Path, out: Path, *args: str):
    return runner.invoke(
        app,
        ["export-scales", str(scales), "--model-dir", str(model), "--out", str(out), *args],
        catch_exceptions=False,
    )


def consumer(report: dict, engine: str, target: str) -> dict:
    (found,) = [c for c in report["consumers"] if c["engine"] == engine and target in c["target"].split("/")]
    return found


def assert_pairs(got: list[tuple[float, float]], want: list[tuple[float, float]]) -> None:
    assert len(got) == len(want) and all(close(a, c) and close(b, d) for (a, b), (c, d) in zip(got, want)), (
        got
    )


def assert_matches_report(values: list[tuple[float, float]], entry: dict) -> None:
    for (k, v), row in zip(values, entry["layers"]):
        assert close(k, row["k_used"]) and close(v, row["v_used"]), (k, v, row)


# --- what the report says each engine reads (real engines: tests/engines/) ---------------------


def test_json_sidecar_carries_the_param_path_block(scales: Path, llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    assert run_export(scales, llama, out, "--format", "json", "--kv-dtype", "fp8").exit_code == 0
    report = json.loads(out.read_text())
    factors = report["kv_cache"]["scaling_factor"]["0"]
    assert factors["1"] * 448 == pytest.approx(max(K_AMAX[1], V_AMAX[1]), rel=MATCH_RTOL)
    assert_matches_report(
        [(factors[str(i)], factors[str(i)]) for i in range(LAYERS)], consumer(report, "sglang", "sm90")
    )
    assert report["convention"] == "448" and "amax / 448" in report["convention_text"]


def test_forced_wrong_convention_shows_the_6x_in_the_report(
    scales: Path, llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ("--kv-dtype", "nvfp4", "--target", "sm100", "--convention", "448", "--force-convention")
    result = run_export(scales, llama, out, "--format", "modelopt", *args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "fp4kv_kv_scales.json").read_text())
    assert report["consumers"][0]["layers"][0]["k_verdict"].startswith("wastes x6")
    assert "--force-convention" in report["warnings"][0]


def test_sglang_reads_per_tensor_compressed_tensors_only(scales: Path, llama: Path, tmp_path: Path) -> None:
    for per_tensor in (False, True):
        out = tmp_path / f"ct{per_tensor}"
        extra = ("--per-tensor",) if per_tensor else ()
        assert (
            run_export(
                scales, llama, out, "--format", "compressed-tensors", "--kv-dtype", "fp8", *extra
            ).exit_code
            == 0
        )
        report = json.loads((out / "fp4kv_kv_scales.json").read_text())
        assert consumer(report, "sglang", "sm90")["reads_scales"] is per_tensor
        assert consumer(report, "vllm", "sm90")["reads_scales"]


def test_trtllm_reads_kv_scales_only_with_fp8_qkv(scales: Path, llama: Path, tmp_path: Path) -> None:
    kv_only = tmp_path / "kv_only"
    args = ("--format", "modelopt", "--kv-dtype", "nvfp4", "--engine", "trtllm", "--target", "sm100")
    assert run_export(scales, llama, kv_only, *args).exit_code == 0
    report = json.loads((kv_only / "fp4kv_kv_scales.json").read_text())
    assert trtllm.kv_scales(kv_only, LAYERS) == [(1.0, 1.0)] * LAYERS
    assert not report["consumers"][0]["reads_scales"]
    # A ModelOpt FP8-weight checkpoint (only hf_quant_config.json): TRT-LLM loads amax/448.
    fp8_model = tmp_path / "fp8_model"
    fp8_model.mkdir()
    for path in llama.iterdir():
        (fp8_model / path.name).write_bytes(path.read_bytes())
    hf = {
        "producer": {"name": "modelopt", "version": "0.35.0"},
        "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
    }
    (fp8_model / "hf_quant_config.json").write_text(json.dumps(hf))
    merged = tmp_path / "merged"
    assert run_export(scales, fp8_model, merged, *args).exit_code == 0
    got = trtllm.kv_scales(merged, LAYERS)
    assert_pairs([(k * 448, v * 448) for k, v in got], list(zip(K_AMAX, V_AMAX))[:LAYERS])
    report = json.loads((merged / "fp4kv_kv_scales.json").read_text())
    assert_matches_report(got, report["consumers"][0])
    hf_out = json.loads((merged / "hf_quant_config.json").read_text())["quantization"]
    assert hf_out["quant_algo"] == "FP8" and hf_out["kv_cache_quant_algo"] == "NVFP4"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    # Older TRT-LLM (TRTLLM_LOAD_KV_SCALES=1, x6) wanted amax/2688: only with --force-convention.
    legacy = tmp_path / "legacy"
    assert (
        run_export(scales, fp8_model, legacy, *args, "--convention", "6x448", "--force-convention").exit_code
        == 0
    )
    assert trtllm.kv_scales(legacy, LAYERS, legacy=True)[0][0] * 448 == pytest.approx(
        K_AMAX[0], rel=MATCH_RTOL
    )


# --- conversion, layout, hard links ------------------------------------------------------------


def test_checkpoint_conversion_6x448_to_448_replaces_old_scales(
    scales: Path, llama: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "sglang", tmp_path / "trtllm"
    assert (
        run_export(
            scales, llama, first, "--format", "modelopt", "--kv-dtype", "nvfp4", "--engine", "sglang"
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "export-scales",
            str(first),
            "--out",
            str(second),
            "--kv-dtype",
            "nvfp4",
            "--format",
            "modelopt",
            "--convention",
            "448",
        ],
    )
    assert result.exit_code == 0, result.output
    report = inspect_path(second)
    assert report["convention"] == "448"
    assert [r["k_amax"] for r in report["layers"]] == pytest.approx(list(K_AMAX[:LAYERS]), rel=MATCH_RTOL)
    index = json.loads((second / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.0.self_attn.k_proj.k_scale"] == SCALES_SHARD
    with safe_open(str(second / SCALES_SHARD), framework="pt") as handle:
        assert float(handle.get_tensor("model.layers.0.self_attn.k_proj.k_scale")) == pytest.approx(
            K_AMAX[0] / 448, rel=MATCH_RTOL
        )
    assert json.loads((second / "hf_quant_config.json").read_text())["producer"]["version"].startswith(
        "0.42.0"
    )


def test_scales_inside_a_weight_shard_are_dropped_and_source_untouched(tmp_path: Path) -> None:
    model = save_qwen2_sharded(tmp_path / "qwen2")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    old = {}
    with safe_open(str(model / shard), framework="pt") as handle:
        old = {k: handle.get_tensor(k) for k in list(handle.keys())}
    for i in range(3):  # a ModelOpt 0.40 NVFP4 checkpoint: amax / 2688 inside the weight shard
        old[f"model.layers.{i}.self_attn.k_proj.k_scale"] = torch.tensor(K_AMAX[i] / 2688)
        old[f"model.layers.{i}.self_attn.v_proj.v_scale"] = torch.tensor(V_AMAX[i] / 2688)
        index["weight_map"][f"model.layers.{i}.self_attn.k_proj.k_scale"] = shard
        index["weight_map"][f"model.layers.{i}.self_attn.v_proj.v_scale"] = shard
    from safetensors.torch import save_file

    save_file(old, str(model / shard), metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    hf = {
        "producer": {"name": "modelopt", "version": "0.40.0"},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": "NVFP4"},
    }
    (model / "hf_quant_config.json").write_text(json.dumps(hf))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "export-scales",
            str(model),
            "--out",
            str(out),
            "--kv-dtype",
            "nvfp4",
            "--format",
            "modelopt",
            "--target",
            "sm120",
        ],
    )
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    with safe_open(str(out / shard), framework="pt") as handle:
        kept = set(handle.keys())
        assert not any(k.endswith("_scale") for k in kept)
        assert torch.equal(
            handle.get_tensor("model.layers.1.self_attn.k_proj.weight"),
            old["model.layers.1.self_attn.k_proj.weight"],
        )
    inspected = inspect_path(out)
    assert inspected["convention"] == "6x448"
    assert [row["k_amax"] for row in inspected["layers"]] == pytest.approx(list(K_AMAX), rel=MATCH_RTOL)
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total == sum(t.numel() * t.element_size() for t in _all_tensors(out))


def _all_tensors(folder: Path) -> list[torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = []
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            tensors += [handle.get_tensor(k) for k in list(handle.keys())]
    return tensors


def test_links_unchanged_files_and_rewrites_config(scales: Path, llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_export(scales, llama, out, "--format", "modelopt", "--kv-dtype", "fp8").exit_code == 0
    assert os.stat(out / "model.safetensors").st_ino == os.stat(llama / "model.safetensors").st_ino
    assert os.stat(out / "config.json").st_ino != os.stat(llama / "config.json").st_ino
    assert "quantization_config" not in json.loads((llama / "config.json").read_text())
    assert not (llama / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.embed_tokens.weight"] == "model.safetensors"
    assert index["model.layers.1.self_attn.v_proj.v_scale"] == SCALES_SHARD


def test_k_offset_kept_out_of_the_index(llama: Path, tmp_path: Path) -> None:
    data = scales_dict(llama, offset=True)
    scales = write_scales(tmp_path / "s.json", data)
    out = tmp_path / "out"
    result = run_export(
        scales, llama, out, "--format", "modelopt", "--kv-dtype", "nvfp4", "--target", "sm100"
    )
    assert result.exit_code == 0, result.output
    assert "k_offset" in result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert OFFSET_FILE not in index["weight_map"].values()
    raw = [entry["k_amax_raw"] for entry in data["layers"]]
    report = json.loads((out / "fp4kv_kv_scales.json").read_text())
    assert [row["k_amax"] for row in report["layers"]] == pytest.approx(raw)  # K scale covers raw K
    assert [row["k_scale"] * report["divisor"] for row in report["layers"]] == pytest.approx(
        raw, rel=MATCH_RTOL
    )
    with safe_open(str(out / OFFSET_FILE), framework="pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.k_proj.k_offset").shape == (2, 16)
    # Why it stays out of the index: vLLM refuses a checkpoint that lists it
    # (tests/engines/test_vllm_engine.py::test_indexed_k_offset_is_refused).


def test_plain_transformers_loads_modelopt_and_compressed_tensors_needs_its_package(
    scales: Path, llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    mo, ct = tmp_path / "mo", tmp_path / "ct"
    assert (
        run_export(
            scales, llama, mo, "--format", "modelopt", "--kv-dtype", "nvfp4", "--target", "sm100"
        ).exit_code
        == 0
    )
    assert run_export(scales, llama, ct, "--format", "compressed-tensors", "--kv-dtype", "fp8").exit_code == 0
    reference = AutoModelForCausalLM.from_pretrained(llama)
    loaded = AutoModelForCausalLM.from_pretrained(mo)  # warns "Unknown quantization type modelopt", skips it
    assert torch.equal(
        loaded.model.layers[1].self_attn.k_proj.weight, reference.model.layers[1].self_attn.k_proj.weight
    )
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="compressed-tensors"):
            AutoModelForCausalLM.from_pretrained(ct)
    else:
        AutoModelForCausalLM.from_pretrained(ct)


# --- bad input: one line, exit != 0, nothing written -------------------------------------------


def assert_clean_failure(result, out: Path, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_bad_inputs_fail_in_one_line(llama: Path, scales: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ("--format", "modelopt", "--kv-dtype", "fp8")
    other = scales_dict(llama)
    other["model"]["config_hash"] = "0" * 16
    assert_clean_failure(
        run_export(write_scales(tmp_path / "a.json", other), llama, out, *common), out, "another model"
    )
    fewer = scales_dict(llama)
    fewer["layers"] = fewer["layers"][:1]
    fewer["model"].pop("config_hash")
    assert_clean_failure(
        run_export(write_scales(tmp_path / "b.json", fewer), llama, out, *common), out, "1 layers"
    )
    for bad in (float("nan"), 0.0, -1.0):
        data = scales_dict(llama)
        data["layers"][1]["v_amax"] = bad
        path = tmp_path / "c.json"
        path.write_text(json.dumps(data))
        assert_clean_failure(run_export(path, llama, out, *common), out, "v_amax")
    assert_clean_failure(
        run_export(scales, llama, out, "--format", "gguf", "--kv-dtype", "fp8"), out, "--format"
    )
    inside = llama / "export"
    assert_clean_failure(run_export(scales, llama, inside, *common), inside, "inside the source")
    assert_clean_failure(
        run_export(scales, llama, out, "--format", "modelopt", "--kv-dtype", "nvfp4"), out, "--target"
    )
    assert_clean_failure(
        run_export(
            scales,
            llama,
            out,
            "--format",
            "modelopt",
            "--kv-dtype",
            "nvfp4",
            "--target",
            "sm100",
            "--convention",
            "448",
        ),
        out,
        "contradicts",
    )
    assert_clean_failure(run_export(scales, llama, out, *common, "--convention", "6x448"), out, "FP8")
    assert_clean_failure(
        run_export(
            scales, llama, out, "--format", "compressed-tensors", "--kv-dtype", "nvfp4", "--convention", "448"
        ),
        out,
        "compressed-tensors",
    )
    assert_clean_failure(
        run_export(scales, llama, out, "--format", "modelopt", "--kv-dtype", "nvfp4", "--target", "sm90"),
        out,
        "sm90",
    )
    out.mkdir()
    result = run_export(scales, llama, out, *common)
    assert result.exit_code == 2 and "already exists" in result.output and not any(out.iterdir())


def test_read_only_destination(
    llama: Path, scales: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "out"
    if os.geteuid() == 0:  # root ignores permission bits: make the temp dir creation fail as EACCES would
        import fp4kv_cli.atomic

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(fp4kv_cli.atomic.tempfile, "mkdtemp", refuse)
    else:
        parent.chmod(0o500)
    try:
        result = run_export(scales, llama, out, "--format", "modelopt", "--kv-dtype", "fp8")
    finally:
        parent.chmod(0o700)
    assert_clean_failure(result, out, "Permission denied")


def test_api_request_reports_files(llama: Path, scales: Path, tmp_path: Path) -> None:
    result = export_scales(
        ExportRequest(
            scales=scales,
            out=tmp_path / "o",
            kv_dtype="nvfp4",
            fmt="modelopt",
            model_dir=llama,
            target="sm120",
        )
    )
    how = {f.name: f.how for f in result.files}
    assert (
        how["model.safetensors"] == "linked"
        and how["config.json"] == "rewritten"
        and how[SCALES_SHARD] == "new"
    )
    assert result.report["warnings"][0].startswith("per-head amax reduced")


def test_4over6_exports_the_nvfp4_checkpoint_with_its_serving_note(
    scales: Path, llama: Path, tmp_path: Path
) -> None:
    """--kv-dtype nvfp4_4over6 writes exactly the nvfp4 export's scale tensors and quant config
    (the rule is store-time only) and the report says how to serve it (vLLM's flag)."""
    outs = {}
    for kv in ("nvfp4", "nvfp4_4over6"):
        outs[kv] = tmp_path / kv
        result = run_export(
            scales, llama, outs[kv], "--format", "modelopt", "--kv-dtype", kv, "--target", "sm100"
        )
        assert result.exit_code == 0, result.output
    for name in (SCALES_SHARD, "hf_quant_config.json"):
        assert (outs["nvfp4"] / name).read_bytes() == (outs["nvfp4_4over6"] / name).read_bytes()
    report = json.loads((outs["nvfp4_4over6"] / "fp4kv_kv_scales.json").read_text())
    assert report["kv_dtype"] == "nvfp4"
    assert any("--kv-cache-dtype nvfp4_4over6" in w for w in report["warnings"])


def test_rotation_is_exported_for_sglang_and_modelopt_and_inspect_reads_it(
    llama: Path, tmp_path: Path
) -> None:
    """A scales file calibrated with --qk-rotation: the export's report names SGLang's flag (and
    ModelOpt's rotate config when the block is the whole head), warns that the K scales are of
    rotated K, and inspect reads the rotation back from the scales file, the sidecar and the folder."""
    for block, modelopt in ((16, "NVFP4_KV_ROTATE_CFG"), (8, None)):  # head_dim 16
        data = scales_dict(llama, offset=True)
        data["k_rotation"] = {"kind": "hadamard", "block": block}
        source = write_scales(tmp_path / f"rot{block}.json", data)
        out = tmp_path / f"out{block}"
        result = run_export(
            source, llama, out, "--format", "modelopt", "--kv-dtype", "nvfp4", "--target", "sm100"
        )
        assert result.exit_code == 0, result.output
        report = json.loads((out / "fp4kv_kv_scales.json").read_text())
        rotation = report["qk_rotation"]
        assert rotation["block"] == block and rotation["sglang"] == f"--qkrot-block {block}"
        assert rotation["modelopt"] == modelopt
        assert any("Hadamard-rotated K" in w for w in report["warnings"])
        for path in (source, out / "fp4kv_kv_scales.json", out):
            seen = inspect_path(path)
            assert seen["qk_rotation"]["block"] == block
            assert any(f"--qkrot-block {block}" in h for h in seen["hazards"])
    plain = inspect_path(write_scales(tmp_path / "plain.json", scales_dict(llama)))
    assert plain["qk_rotation"] is None
