"""scripts/k_smoothing.py: the per-rotary-pair factors fold into q/k projections, and what it measures."""

from pathlib import Path

import torch
from conftest import load_script
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from fp4kv_cli.models import load_model_and_tokenizer

smoothing = load_script("k_smoothing")


def test_pair_factors_commute_with_rope_and_keep_scores() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(4, 9, 32), torch.randn(2, 9, 32) * torch.linspace(0.1, 20, 32)
    factors = smoothing.pair_factors(k, 0.5)
    assert torch.equal(factors[:, :16], factors[:, 16:])
    angles = torch.randn(9, 16)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    rotated_then_scaled = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)[1] / factors[:, None, :]
    scaled_then_rotated = apply_rotary_pos_emb(q, k / factors[:, None, :], cos, sin, unsqueeze_dim=0)[1]
    torch.testing.assert_close(rotated_then_scaled, scaled_then_rotated)
    scaled_q = q * factors.repeat_interleave(2, 0)[:, None, :]
    assert smoothing.attention_kl(scaled_q, k / factors[:, None, :], k / factors[:, None, :]) == 0
    scores = q @ k.repeat_interleave(2, 0).transpose(1, 2)
    smoothed = scaled_q @ (k / factors[:, None, :]).repeat_interleave(2, 0).transpose(1, 2)
    torch.testing.assert_close(smoothed, scores, rtol=1e-5, atol=1e-4)


def test_alpha_zero_is_the_plain_centered_cache(tiny_qwen2_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_qwen2_dir), "cpu", torch.float32)
    captured = smoothing.capture_queries_and_keys(model, tokenizer, "Question: 2 + 3?\nAnswer: 5")
    assert sorted(captured) == list(range(model.config.num_hidden_layers))
    assert model.config._attn_implementation == "sdpa"
    q, k = captured[0]
    assert q.shape[0] == model.config.num_attention_heads and k.shape[0] == model.config.num_key_value_heads
    offset = k.mean(dim=1)
    centered = k - offset[:, None, :]
    plain = smoothing.attention_kl(q, centered, smoothing.stored(smoothing.NVFP4, centered))
    kls = smoothing.layer_kls(q, k, offset, [0.0, 0.5])
    assert len(kls) == 2 + len(smoothing.REFERENCE_ROWS)
    assert kls[0] == plain and plain > 0 and kls[1] != plain
    by_tokens = smoothing.token_blocks_stored(smoothing.NVFP4, centered)
    assert by_tokens.shape == centered.shape and kls[2] == smoothing.attention_kl(q, centered, by_tokens)
    assert 0 < kls[3] < plain  # fp8 keeps more of the keys than nvfp4
