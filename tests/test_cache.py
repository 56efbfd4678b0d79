"""The quantized KV cache: bytes in the buffers, scales, memory accounting, and generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from fp4kv_cli.cache import CAPACITY_CHUNK, QuantKVCache
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.models import cache_argument
from fp4kv_cli.quant import reference
from fp4kv_cli.quant.methods import BF16KVMethod, LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method
from fp4kv_cli.quant.storage import KVStorage

B, H, D = 2, 2, 32


def _kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, tokens, D, generator=g), torch.randn(B, H, tokens, D, generator=g) * 3


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B * T * H, D]`` in slot order (row b, position t, head h)."""
    return x.transpose(1, 2).reshape(-1, x.shape[-1])


def _reference_bytes(
    name: str, x: torch.Tensor, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = _rows(x)
    if name == "nvfp4":
        return reference.nvfp4_quantize_reference(rows, scale)
    if name == "blockfp4":
        return reference.blockfp4_quantize_reference(rows)
    return reference.fp8_quantize_reference(rows, scale).view(torch.uint8), None


@pytest.mark.parametrize("name", ["nvfp4", "blockfp4", "fp8"])
def test_buffers_hold_the_reference_bytes(name: str) -> None:
    method = get_kv_cache_method(name)
    scales = LayerScales(k=torch.tensor([0.02]), v=torch.tensor([0.03])) if method.uses_tensor_scale else None
    cache = QuantKVCache(method, num_layers=1, scales=scales)
    prefill, step = _kv(5), _kv(1, seed=1)
    cache.update(*prefill, 0)
    keys, values = cache.update(*step, 0)
    layer = cache.layers[0]
    full_k, full_v = (torch.cat([a, b], dim=2) for a, b in zip(prefill, step))
    for x, data, block, s in (
        (full_k, layer.buffers.k, layer.buffers.k_scale, None if scales is None else scales.k[0]),
        (full_v, layer.buffers.v, layer.buffers.v_scale, None if scales is None else scales.v[0]),
    ):
        packed, block_scales = _reference_bytes(name, x, s)
        slots = data.view(B, layer.capacity, H, -1)[:, :6].reshape(B * 6 * H, -1)
        assert torch.equal(slots.view(torch.uint8), packed)
        if block_scales is not None:
            assert torch.equal(
                block.view(B, layer.capacity, H, -1)[:, :6].reshape(B * 6 * H, -1), block_scales
            )
    # A decode step reads every token back from the buffers: the reference dequantization.
    if name == "nvfp4":
        packed, block_scales = _reference_bytes(name, full_k, scales.k[0])
        expected = reference.nvfp4_dequantize_reference(packed, block_scales, scales.k[0], torch.float32)
    elif name == "blockfp4":
        expected = reference.blockfp4_dequantize_reference(
            *_reference_bytes(name, full_k, None), torch.float32
        )
    else:
        stored = reference.fp8_quantize_reference(_rows(full_k), 0.02)
        expected = reference.fp8_dequantize_reference(stored, 0.02, torch.float32)
    assert torch.equal(_rows(keys), expected)
    assert keys.shape == values.shape == (B, H, 6, D)


def test_prefill_attends_to_fresh_values_and_later_chunks_to_the_buffers() -> None:
    cache = QuantKVCache(get_kv_cache_method("blockfp4"), num_layers=1)
    first, second = _kv(4), _kv(3, seed=2)
    keys, values = cache.update(*first, 0)
    assert torch.equal(keys, first[0]) and torch.equal(values, first[1])
    keys, _ = cache.update(*second, 0)
    assert torch.equal(keys[:, :, 4:], second[0])
    stored = reference.blockfp4_dequantize_reference(
        *reference.blockfp4_quantize_reference(_rows(first[0])), torch.float32
    )
    assert torch.equal(_rows(keys[:, :, :4].contiguous()), stored)


def test_dynamic_scale_ignores_padding() -> None:
    cache = QuantKVCache(get_kv_cache_method("nvfp4"), num_layers=1)
    k, v = _kv(6)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[0, :2] = 0
    k[0, :, :2] = 1e4  # padding junk that must not set the scale
    v[0, :, :2] = -1e4
    cache.set_token_mask(mask)
    cache.update(k, v, 0)
    real = mask.bool()[:, None, :, None].expand_as(k)
    k_scale, v_scale = cache.layer_scales()
    assert k_scale[0] == pytest.approx(float(k[real].abs().max()) / (6 * 448), rel=1e-6)
    assert v_scale[0] == pytest.approx(float(v[real].abs().max()) / (6 * 448), rel=1e-6)


def test_memory_accounting_is_the_real_buffer_size() -> None:
    nv = QuantKVCache(get_kv_cache_method("nvfp4"), num_layers=3, capacity_hint=40)
    bf = QuantKVCache(BF16KVMethod(torch.bfloat16), num_layers=3, capacity_hint=40)
    for cache in (nv, bf):
        for layer in range(3):
            cache.update(*(x.bfloat16() for x in _kv(7)), layer)
    assert nv.bytes_per_token() == 3 * 2 * H * (D // 2 + D // 16)
    assert nv.bytes_per_token() == get_kv_cache_method("nvfp4").compute_cell_size(H, D, 3)
    assert nv.bytes_per_token() / bf.bytes_per_token() == 0.28125
    assert nv.stored_bytes() == nv.bytes_per_token() * B * 7
    assert nv.capacity_bytes() == nv.bytes_per_token() * B * CAPACITY_CHUNK


def test_capacity_grows_in_chunks_and_keeps_tokens() -> None:
    cache = QuantKVCache(BF16KVMethod(torch.float32), num_layers=1)
    first = _kv(CAPACITY_CHUNK - 1)
    cache.update(*first, 0)
    assert cache.layers[0].capacity == CAPACITY_CHUNK
    cache.update(*_kv(2, seed=3), 0)
    keys, _ = cache.update(*_kv(1, seed=4), 0)
    assert cache.layers[0].capacity == 2 * CAPACITY_CHUNK
    assert cache.get_seq_length() == CAPACITY_CHUNK + 2
    assert torch.equal(keys[:, :, : CAPACITY_CHUNK - 1], first[0])


def test_k_offset_is_subtracted_before_store() -> None:
    offset = torch.randn(H, D)
    method = get_kv_cache_method("blockfp4")
    cache = QuantKVCache(method, num_layers=1, k_offsets=offset[None])
    k, v = _kv(3)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    packed, _ = reference.blockfp4_quantize_reference(_rows(k - offset[:, None, :]))
    assert torch.equal(layer.buffers.k.view(B, layer.capacity, H, -1)[:, :3].reshape(B * 3 * H, -1), packed)


def test_reconstruction_error_tracking() -> None:
    errors = {}
    for name in ("bf16", "nvfp4"):
        method = BF16KVMethod(torch.float32) if name == "bf16" else get_kv_cache_method(name)
        cache = QuantKVCache(method, num_layers=2)
        cache.track_errors()
        for layer in range(2):
            cache.update(*_kv(9), layer)
        sums = cache.error_sums()
        errors[name] = (sums[:, 0] / sums[:, 1]).sqrt()
    assert torch.equal(errors["bf16"], torch.zeros(2))
    assert bool(((errors["nvfp4"] > 0.01) & (errors["nvfp4"] < 0.3)).all())


def test_batch_select_and_reorder_move_rows() -> None:
    cache = QuantKVCache(BF16KVMethod(torch.float32), num_layers=1)
    k, v = _kv(4)
    cache.update(k, v, 0)
    cache.reorder_cache(torch.tensor([1, 0]))
    keys, _ = cache.update(*_kv(1, seed=5), 0)
    assert torch.equal(keys[:, :, :4], k.flip(0))
    cache.batch_select_indices(torch.tensor([1]))
    keys, _ = cache.update(torch.zeros(1, H, 1, D), torch.zeros(1, H, 1, D), 0)
    assert keys.shape == (1, H, 6, D) and torch.equal(keys[0, :, :4], k[0])


def test_mismatched_scales_are_rejected() -> None:
    scales = LayerScales(k=torch.ones(3), v=torch.ones(3))
    with pytest.raises(FP4KVError, match="3 layers but the model has 2"):
        QuantKVCache(get_kv_cache_method("nvfp4"), num_layers=2, scales=scales)


def test_scales_and_offsets_reach_the_layers_through_the_storage() -> None:
    method = get_kv_cache_method("nvfp4")
    scales = LayerScales(k=torch.tensor([1.0, 2.0]), v=torch.tensor([3.0, 4.0]))
    offsets = torch.arange(2 * H * D, dtype=torch.float32).reshape(2, H, D)
    cache = QuantKVCache(method, num_layers=2, scales=scales, k_offsets=offsets)
    assert [float(layer.k_scale) for layer in cache.layers] == [1.0, 2.0]
    assert [float(layer.v_scale) for layer in cache.layers] == [3.0, 4.0]
    assert all(torch.equal(layer.k_offset, offsets[i]) for i, layer in enumerate(cache.layers))
    for make in (lambda: QuantKVCache(method, num_layers=3, k_offsets=offsets),
                 lambda: KVStorage.uniform(method, 3, k_offsets=offsets)):  # fmt: skip
        with pytest.raises(FP4KVError, match="k_offset covers 2 layers but the model has 3"):
            make()
    with pytest.raises(FP4KVError, match="scales cover 2 layers but the model has 3"):
        KVStorage.uniform(method, 3).with_scales(scales)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_bf16_method_generates_exactly_like_dynamic_cache(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    kwargs = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": 24,
        "do_sample": False,
        "pad_token_id": 0,
    }
    argument = cache_argument(model)
    with torch.inference_mode():
        expected = model.generate(**kwargs, **{argument: DynamicCache(config=model.config)})
        cache = QuantKVCache.for_model(model.config, BF16KVMethod(torch.float32))
        cache.set_token_mask(mask)
        got = model.generate(**kwargs, **{argument: cache})
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == expected.shape[1] - 1


def test_quantized_cache_works_in_generate_and_plain_forward(tiny_qwen2_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    argument = cache_argument(model)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cache = QuantKVCache.for_model(model.config, get_kv_cache_method("nvfp4"))
        out = model.generate(
            input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, **{argument: cache}
        )
        assert out.shape == (2, 18) and cache.get_seq_length() == 17
        cache = QuantKVCache.for_model(model.config, get_kv_cache_method("nvfp4"))
        first = model(input_ids=ids[:, :8], use_cache=True, **{argument: cache}).logits
        second = model(input_ids=ids[:, 8:], use_cache=True, **{argument: cache}).logits
        plain = model(input_ids=ids).logits
    assert cache.get_seq_length() == 12 and cache.get_mask_sizes(1, 0) == (13, 0)
    torch.testing.assert_close(first, plain[:, :8])  # the prefill attends to fresh K/V
    assert 0 < (second - plain[:, 8:]).abs().max() < 0.5 * plain.abs().max()


def test_k_centering_leaves_attention_unchanged(tiny_qwen2_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    argument = cache_argument(model)
    text = model.config.get_text_config()
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    offsets = torch.randn(text.num_hidden_layers, heads, dim, generator=torch.Generator().manual_seed(2)) * 3
    ids = torch.randint(3, text.vocab_size, (1, 14), generator=torch.Generator().manual_seed(3))
    logits, stored = [], []
    with torch.inference_mode():
        for k_offsets in (None, offsets):
            cache = QuantKVCache.for_model(model.config, BF16KVMethod(torch.float32), k_offsets=k_offsets)
            pieces = [
                model(input_ids=ids[:, i : i + 5], use_cache=True, **{argument: cache}).logits
                for i in (0, 5, 10)
            ]
            logits.append(torch.cat(pieces, dim=1))
            stored.append(cache.layers[0].buffers.k.view(1, -1, heads, dim)[:, :14])
    torch.testing.assert_close(stored[1], stored[0] - offsets[0])  # K is stored centered
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)  # softmax cancels the shift
