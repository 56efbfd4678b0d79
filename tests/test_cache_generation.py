"""Generation through the quantized cache equals generation through an independent fake-quant cache.

The fake-quant cache is a plain transformers ``DynamicLayer`` that keeps, for every token, the
values the reference functions round-trip (``quantize -> dequantize``), and attends like a
serving engine: a multi-token forward sees the stored prefix plus its own fresh K/V, a one-token
decode step sees only stored values. If the quantized cache wrote or read a wrong slot, row,
head, scale or offset anywhere on the decode path, greedy tokens would drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_interpreted_kernels
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.models import cache_argument
from fp4kv_cli.quant import methods as methods_module
from fp4kv_cli.quant import reference
from fp4kv_cli.quant.methods import LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method

NEW_TOKENS = 24


def fake_quant(fmt: str, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x [batch, heads, T, dim]`` after a reference quantize/dequantize round trip, same dtype."""
    rows = x.reshape(-1, x.shape[-1])
    if fmt == "nvfp4":
        packed, block_scales = reference.nvfp4_quantize_reference(rows, scale)
        back = reference.nvfp4_dequantize_reference(packed, block_scales, scale, torch.float32)
    elif fmt == "blockfp4":
        back = reference.blockfp4_dequantize_reference(
            *reference.blockfp4_quantize_reference(rows), torch.float32
        )
    else:
        back = reference.fp8_dequantize_reference(
            reference.fp8_quantize_reference(rows, scale), scale, torch.float32
        )
    return back.reshape(x.shape).to(x.dtype)


class FakeQuantLayer(DynamicLayer):
    """A ``DynamicLayer`` holding round-tripped K/V (K centered by ``k_offset`` first)."""

    def __init__(self, fmt: str, k_scale: Any, v_scale: Any, k_offset: torch.Tensor | None) -> None:
        super().__init__()
        self.fmt, self.k_scale, self.v_scale, self.k_offset = fmt, k_scale, v_scale, k_offset

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.k_offset is not None:
            key_states = (key_states.float() - self.k_offset[:, None, :]).to(key_states.dtype)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        past_k, past_v = self.keys, self.values
        self.keys = torch.cat([past_k, fake_quant(self.fmt, key_states, self.k_scale)], dim=-2)
        self.values = torch.cat([past_v, fake_quant(self.fmt, value_states, self.v_scale)], dim=-2)
        if key_states.shape[-2] == 1:
            return self.keys, self.values
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)


@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "blockfp4"])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_quantized_generation_equals_fake_quant_reference(
    fixture: str, fmt: str, centered: bool, request: pytest.FixtureRequest
) -> None:
    check_generation(request.getfixturevalue(fixture), fmt, centered)


@pytest.fixture(scope="module")
def interpreted_backend() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield load_interpreted_kernels().TritonBackend()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("fmt", ["nvfp4", "blockfp4"])
def test_triton_kernels_generate_like_the_reference(
    tiny_qwen2_dir: Path, fmt: str, interpreted_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton store/gather kernels (interpreted on CPU) on the real decode path."""
    monkeypatch.setattr(methods_module, "get_backend", lambda device: interpreted_backend)
    check_generation(tiny_qwen2_dir, fmt, centered=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "blockfp4"])
def test_gpu_kernels_generate_like_the_reference(tiny_qwen2_dir: Path, fmt: str) -> None:
    """The compiled kernels (the backend the eval uses on a GPU) on the real decode path."""
    check_generation(tiny_qwen2_dir, fmt, centered=True, device="cuda")


def check_generation(folder: Path, fmt: str, centered: bool, device: str = "cpu") -> None:
    """Greedy generation with left padding through the quantized cache equals the fake-quant
    cache's, logits included, and quantization visibly moved the logits."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    text = model.config.get_text_config()
    layers, heads = text.num_hidden_layers, text.num_key_value_heads
    dim = text.hidden_size // text.num_attention_heads
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, text.vocab_size, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :13] = 0
    # Deliberately different scales per layer and for K vs V, so a mixed-up layer or K/V shows.
    scales = LayerScales(
        k=torch.rand(layers, generator=g) * 0.01 + 0.002, v=torch.rand(layers, generator=g) * 0.002 + 0.001
    )
    offsets = torch.randn(layers, heads, dim, generator=g) * 0.5 if centered else None
    ids, mask = ids.to(device), mask.to(device)
    scales = LayerScales(k=scales.k.to(device), v=scales.v.to(device))
    offsets = None if offsets is None else offsets.to(device)
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS,
              "do_sample": False, "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True}  # fmt: skip
    argument = cache_argument(model)
    with torch.inference_mode():
        reference_cache = DynamicCache(config=model.config)
        reference_cache.layers = [
            FakeQuantLayer(fmt, scales.k[i], scales.v[i], None if offsets is None else offsets[i])
            for i in range(layers)
        ]
        expected = model.generate(**kwargs, **{argument: reference_cache})
        plain = model.generate(**kwargs, **{argument: DynamicCache(config=model.config)})
        cache = QuantKVCache.for_model(
            model.config, get_kv_cache_method(fmt), scales=scales, k_offsets=offsets
        )
        got = model.generate(**kwargs, **{argument: cache})
    expected_scores, got_scores = _finite(expected.scores), _finite(got.scores)
    assert (expected_scores - _finite(plain.scores)).abs().max() > 1e-3
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(got_scores, expected_scores, rtol=0, atol=1e-5)


def _finite(scores: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-step logits stacked, with the ``-inf`` of suppressed tokens (EOS before
    ``min_new_tokens``) set to 0 so differences are finite."""
    stacked = torch.stack(scores)
    return torch.where(torch.isfinite(stacked), stacked, torch.zeros((), device=stacked.device))
