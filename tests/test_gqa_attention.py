"""Gather-read decode steps with native grouped K/V (no ``repeat_kv`` copy) give the same bits."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.evaluate import generate
from fp4kv_cli.evaluate.generate import greedy_config, left_pad
from fp4kv_cli.gqa_attention import gqa_decode
from fp4kv_cli.models import load_model_and_tokenizer
from fp4kv_cli.quant.registry import get_kv_cache_method


def test_decode_logits_are_bit_identical_to_repeat_kv(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), "cpu", "fp32")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # a GQA model
    prompts = [
        tokenizer(t)["input_ids"] for t in ("Question: 2 + 3 = ?", "Hi", "A longer prompt, with words.")
    ]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id, torch.device("cpu"))  # padding: a mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    for gqa in (False, True):
        cache = QuantKVCache.for_model(model.config, get_kv_cache_method("nvfp4"), capacity_hint=64)
        cache.set_token_mask(mask)
        steps = []
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
            token, step_mask, pos = out.logits[:, -1].argmax(-1, keepdim=True), mask, positions[:, -1:]
            with gqa_decode(model) if gqa else torch.inference_mode() as on:
                assert on is not False
                for _ in range(4):
                    step_mask = torch.cat([step_mask, step_mask.new_ones(step_mask.shape[0], 1)], 1)
                    pos = pos + 1
                    out = model(
                        input_ids=token, attention_mask=step_mask, position_ids=pos, past_key_values=cache
                    )
                    steps.append(out.logits[:, -1])
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
        assert model.config._attn_implementation == "sdpa"  # restored
        logits.append(torch.stack(steps))
    assert torch.equal(logits[0], logits[1])


def test_generate_batch_uses_it_and_gives_the_same_tokens(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), "cpu", "fp32")
    prompts = [tokenizer(t)["input_ids"] for t in ("Question: 2 + 3 = ?", "Hi")]
    config = greedy_config(model, tokenizer, 10, ["Question:"])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    grouped: list[bool] = []

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        grouped.append(bool(kwargs.get("enable_gqa", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    runs = []
    for gqa in (True, False):
        if not gqa:
            monkeypatch.setattr(generate, "gqa_decode", lambda model: nullcontext(False))
        cache = QuantKVCache.for_model(model.config, get_kv_cache_method("fp8"), capacity_hint=64)
        runs.append(
            generate.generate_batch(model, tokenizer, prompts, cache, config, ["Question:"], "gather")
        )
        if gqa:
            assert any(grouped)  # the decode steps ran through it
            grouped.clear()
    assert not any(grouped)
    assert runs[0] == runs[1]
