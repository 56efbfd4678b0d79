"""Today's architectures through fp4kv, as tiny random configs: calibrate records exactly the K/V
the model's own ``DynamicCache`` holds, the eval cache with bf16 storage generates exactly what
``DynamicCache`` generates, and the decode read each would use on a GPU (with the reason).

The architectures cover the attention variants users serve: llama3 RoPE scaling (Llama 3.x),
QK-norm (Qwen3, Qwen3-MoE), logit softcapping and sliding windows with head_dim 256 (Gemma 2),
sliding windows with local RoPE (Gemma 3), a sliding window on every layer (Mistral), attention
sinks with alternating windows and MoE (gpt-oss), fused QKV (Phi-3).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SPECIAL_TOKENS, char_tokenizer
from transformers import AutoModelForCausalLM, DynamicCache

from fp4kv_cli import fused_attention
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.calibration.capture import RecordingCache
from fp4kv_cli.evaluate.generate import greedy_config, left_pad
from fp4kv_cli.evaluate.runner import kv_method
from fp4kv_cli.evaluate.static_decode import decode_path
from fp4kv_cli.models import cache_argument, load_model_and_tokenizer

VOCAB = len(SPECIAL_TOKENS) + len(set(string.printable))
COMMON = dict(vocab_size=VOCAB, bos_token_id=None, eos_token_id=2, pad_token_id=1, max_position_embeddings=256)
PROMPTS = ["Question: what is 2 + 3?\nAnswer:", "The cat sat on the mat because", "x"]
NEW_TOKENS = 12


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, **COMMON)  # fmt: skip


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                          num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, **COMMON)  # fmt: skip


def _llama3() -> Any:
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, rope_parameters=rope, **COMMON)  # fmt: skip


def _gemma2() -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=256, sliding_window=8, query_pre_attn_scalar=256,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **COMMON)  # fmt: skip


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=64, sliding_window=8,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                            **COMMON)  # fmt: skip


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, sliding_window=8, **COMMON)  # fmt: skip


def _gpt_oss() -> Any:
    from transformers import GptOssConfig

    return GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        **COMMON)  # fmt: skip


def _phi3() -> Any:
    from transformers import Phi3Config

    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, **COMMON)  # fmt: skip


#: name -> (config builder, the decode read a CUDA run would take with a bf16 cache).
ARCHITECTURES: dict[str, tuple[Callable[[], Any], str]] = {
    "qwen3": (_qwen3, "graph"),
    "qwen3_moe": (_qwen3_moe, "graph"),
    "llama3": (_llama3, "graph"),
    "gemma2": (_gemma2, "gather"),
    "gemma3": (_gemma3, "fused"),
    "mistral": (_mistral, "fused"),
    "gpt_oss": (_gpt_oss, "gather"),
    "phi3": (_phi3, "graph"),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny random checkpoint folder of one architecture (bf16 weights, char tokenizer)."""
    name = request.param
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[name][0](), dtype=torch.bfloat16).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    char_tokenizer(with_pad=True).save_pretrained(folder)
    return name, folder


def _inputs(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return left_pad(ids, tokenizer.pad_token_id, torch.device("cpu"))


def test_calibration_records_what_the_dynamic_cache_holds(arch_dir: tuple[str, Path]) -> None:
    _, folder = arch_dir
    model, tokenizer = load_model_and_tokenizer(str(folder), device="cpu", dtype="bf16")
    input_ids, attention_mask = _inputs(tokenizer)
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    recording = RecordingCache(model.config, lambda i, k, v: recorded.setdefault(i, (k.clone(), v.clone())))
    reference = DynamicCache(config=model.config)
    with torch.inference_mode():
        for cache in (recording, reference):
            model(input_ids=input_ids, attention_mask=attention_mask, **{cache_argument(model): cache})
    assert sorted(recorded) == list(range(len(reference.layers)))
    for index, layer in enumerate(reference.layers):
        k, v = recorded[index]
        kept = layer.keys.shape[-2]  # a sliding-window layer keeps only the last tokens
        assert kept > 0
        torch.testing.assert_close(k[..., -kept:, :], layer.keys, rtol=0, atol=0)
        torch.testing.assert_close(v[..., -kept:, :], layer.values, rtol=0, atol=0)


def test_bf16_storage_generates_what_the_dynamic_cache_generates(arch_dir: tuple[str, Path]) -> None:
    _, folder = arch_dir
    model, tokenizer = load_model_and_tokenizer(str(folder), device="cpu", dtype="bf16")
    input_ids, attention_mask = _inputs(tokenizer)
    config = greedy_config(model, tokenizer, NEW_TOKENS, [])
    config.min_new_tokens = NEW_TOKENS  # random weights may pick EOS early; compare every step
    outputs = []
    with torch.inference_mode():
        for cache in (
            DynamicCache(config=model.config),
            QuantKVCache.for_model(model.config, kv_method("bf16", torch.bfloat16)),
        ):
            if isinstance(cache, QuantKVCache):
                cache.set_token_mask(attention_mask)
            outputs.append(
                model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                               **{cache_argument(model): cache})  # fmt: skip
            )
    assert outputs[0].shape[1] == input_ids.shape[1] + NEW_TOKENS
    assert torch.equal(outputs[0], outputs[1])


def test_decode_path_and_reason(arch_dir: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    name, folder = arch_dir
    model, _ = load_model_and_tokenizer(str(folder), device="cpu", dtype="bf16")
    cache = QuantKVCache.for_model(model.config, kv_method("bf16", torch.bfloat16))
    model_checks = []
    real = fused_attention.fused_decode_refusal
    monkeypatch.setattr(fused_attention, "fused_decode_refusal", lambda *a: model_checks.append(a) or real(*a))
    path, reason = decode_path(model, cache, torch.device("cuda"))
    assert len(model_checks) == 1  # the model-level check runs once, not again under the layer check
    assert path == ARCHITECTURES[name][1], reason
    assert reason
    cpu_path, cpu_reason = decode_path(model, cache)
    assert cpu_path == "gather"
    assert cpu_reason == reason if path == "gather" else "CUDA" in cpu_reason
