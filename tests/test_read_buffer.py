"""The read buffer: every K/V a layer hands to attention is bit-identical to dequantizing the
stored bytes again, through decode steps, chunks, capacity growth, crop, reorder, batch select,
repeat-interleave and a reset that changes the dynamic scale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fp4kv_cli.cache import CAPACITY_CHUNK, QuantKVCache, QuantKVLayer, ReadBuffer, _from_rows
from fp4kv_cli.quant.methods import LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method

B, H, D = 3, 2, 32


def _kv(batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, H, tokens, D, generator=g) * (1 + seed % 3) + 0.5
    return k, torch.randn(batch, H, tokens, D, generator=g) * 2


def _redequantized(layer: QuantKVLayer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` stored tokens dequantized again from the layer's buffers, as the read
    path did before the read buffer existed."""
    rows = torch.arange(layer.batch).unsqueeze(1) * layer.capacity
    loc = (rows + torch.arange(length)).reshape(-1)
    b = layer.buffers
    k = layer.k_method.dequantize(b.k, b.k_scale, loc, layer.k_scale, layer.dtype)
    v = layer.v_method.dequantize(b.v, b.v_scale, loc, layer.v_scale, layer.dtype)
    return _from_rows(k, layer.batch), _from_rows(v, layer.batch)


def _check(cache: QuantKVCache, k: torch.Tensor, v: torch.Tensor) -> None:
    """Run one update and compare what attention gets with re-dequantizing, bit for bit."""
    layer = cache.layers[0]
    start, new = layer.length, k.shape[-2]
    got_k, got_v = cache.update(k, v, 0)
    if new == 1:  # decode: everything, the step's own token included, from the stored bytes
        want_k, want_v = _redequantized(layer, start + 1)
    elif start == 0:  # prefill: its own fresh values
        want_k = k if layer.k_offset is None else (k - layer.k_offset[:, None, :]).to(k.dtype)
        want_v = v
    else:  # chunk: the stored prefix read back, then its own fresh values
        past_k, past_v = _redequantized(layer, start)
        fresh = k if layer.k_offset is None else (k.float() - layer.k_offset[:, None, :]).to(k.dtype)
        want_k, want_v = torch.cat([past_k, fresh], -2), torch.cat([past_v, v], -2)
    assert got_k.shape == want_k.shape and got_v.shape == want_v.shape
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", ["calibrated", "dynamic"])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("name", ["fp8", "nvfp4", "blockfp4"])
def test_reads_are_bit_identical_to_redequantizing(
    name: str, center: bool, scales: str, dtype: torch.dtype
) -> None:
    method = get_kv_cache_method(name)
    layer_scales = None
    if scales == "calibrated" and method.uses_tensor_scale:
        layer_scales = LayerScales(k=torch.tensor([0.01]), v=torch.tensor([0.02]))
    offsets = torch.randn(1, H, D) if center else None
    cache = QuantKVCache(method, num_layers=1, scales=layer_scales, k_offsets=offsets, capacity_hint=8)
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[0, :2] = 0  # left padding stays out of dynamic scales
    cache.set_token_mask(mask)
    seed = iter(range(100))

    def step(batch: int, tokens: int) -> None:
        k, v = _kv(batch, tokens, next(seed))
        _check(cache, k.to(dtype), v.to(dtype))

    step(B, 5)  # prefill
    for _ in range(3):
        step(B, 1)
    step(B, 4)  # teacher-forced chunk
    step(B, 1)
    step(B, CAPACITY_CHUNK)  # grows the capacity past the first chunk
    step(B, 1)
    cache.crop(-6)  # the last tokens are forgotten, then written again
    step(B, 1)
    step(B, 3)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    step(B, 1)
    cache.batch_select_indices(torch.tensor([0, 2]))
    step(2, 1)
    cache.batch_repeat_interleave(2)
    step(4, 1)
    layer = cache.layers[0]
    before = None if layer.k_scale is None else layer.k_scale.clone()
    cache.crop(-layer.length)  # back to empty: a dynamic scale is set again by the next prefill
    cache.set_token_mask(None)
    k, v = _kv(4, 6, 99)
    _check(cache, (k * 7).to(dtype), (v * 7).to(dtype))
    if scales == "dynamic" and method.uses_tensor_scale:
        assert not torch.equal(layer.k_scale, before)  # the scale changed under the read buffer
    step(4, 1)
    step(4, 1)
    cache.reset()
    cache.set_token_mask(None)
    step(B, 4)
    step(B, 1)


def test_decode_reads_only_the_prefix_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first decode step dequantizes the prompt's stored tokens; every step's own token comes
    from its store (``store_and_read_pair``), so later steps read nothing back from the buffers."""
    method = get_kv_cache_method("blockfp4")
    cache = QuantKVCache(method, num_layers=1)
    cache.update(*_kv(B, 40, 0), 0)
    counted: list[int] = []
    stored: list[int] = []
    original, original_store = method.dequantize, method.store_and_read_pair

    def counting(data: torch.Tensor, scale: torch.Tensor, loc: torch.Tensor, *args: object) -> torch.Tensor:
        counted.append(int(loc.numel()))
        return original(data, scale, loc, *args)

    def counting_store(buffers: tuple, loc: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        stored.append(int(loc.numel()))
        return original_store(buffers, loc, *args)

    monkeypatch.setattr(method, "dequantize", counting)
    monkeypatch.setattr(method, "store_and_read_pair", counting_store)
    cache.update(*_kv(B, 1, 1), 0)  # first read: the 40 stored tokens
    cache.update(*_kv(B, 1, 2), 0)
    cache.update(*_kv(B, 1, 3), 0)
    assert counted == [B * 40, B * 40]  # K and V, once
    assert stored == [B] * 3  # K and V together, each step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["bf16", "fp8", "nvfp4", "nvfp4_4over6", "blockfp4"])
def test_store_and_read_gives_what_dequantize_reads(name: str, dtype: torch.dtype) -> None:
    """``store_and_read`` writes the bytes ``store`` writes and returns, bit for bit, what
    ``dequantize`` of those slots gives (zero blocks, tiny, huge and tie values included)."""
    method = get_kv_cache_method(name)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, H, D, generator=g) * 3
    x[0, 0] = 0.0  # all-zero blocks
    x[1, 0, :16] = 1e-30  # scales that underflow
    x[1, 1, :16] = 3e4  # saturating ones
    x[2, 0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0])  # E2M1 ties
    x = x.to(dtype)
    scale = torch.tensor(0.01) if method.uses_tensor_scale else None
    loc = torch.tensor([9, 2, 5, 0, 7, 3])
    made = [method.create_buffers(12, H, D, 1, "cpu") for _ in range(2)]
    (a_data, a_scale), (b_data, b_scale) = (
        (m["k_buffer"][0], m["k_scale_buffer"][0] if m["k_scale_buffer"] else None) for m in made
    )
    method.store(a_data, a_scale, loc, x, scale)
    got = method.store_and_read(b_data, b_scale, loc, x, scale, dtype)
    assert torch.equal(a_data.view(torch.uint8), b_data.view(torch.uint8))
    if a_scale is not None:
        assert torch.equal(a_scale, b_scale)
    want = method.dequantize(a_data, a_scale, loc, scale, dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_fidelity_matches_redequantizing_reads(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher-forced logits through the read buffer equal those of a layer that
    re-dequantizes its whole prefix at every read (the previous read path), exactly."""
    from transformers import AutoModelForCausalLM

    from fp4kv_cli.evaluate.fidelity import teacher_forced_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    prompt, answer = list(range(5, 45)), list(range(50, 90))
    method = get_kv_cache_method("nvfp4")
    fast = teacher_forced_logits(model, prompt, answer, QuantKVCache.for_model(model.config, method))

    def reread(layer: QuantKVLayer, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.read_buffer is None:  # the chunk path puts its fresh K/V after the prefix there
            shape = (layer.batch, layer.heads, layer.capacity, layer.head_dim, layer.dtype, layer.device)
            layer.read_buffer = ReadBuffer(*shape)
        k, v = _redequantized(layer, length)
        layer.read_buffer.write(0, k, v)
        return k, v

    monkeypatch.setattr(QuantKVLayer, "_read", reread)
    slow = teacher_forced_logits(model, prompt, answer, QuantKVCache.for_model(model.config, method))
    assert torch.equal(fast, slow)


def test_fidelity_runs_the_reference_once_per_sample(tiny_llama_dir: Path) -> None:
    """The reference format's own row reuses the reference pass: the same figures as a separate
    pass of the same storage, one pass fewer per sample."""
    from transformers import AutoModelForCausalLM

    from fp4kv_cli.evaluate.fidelity import measure_fidelity
    from fp4kv_cli.quant.methods import BF16KVMethod

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    samples = [(list(range(5, 45)), list(range(50, 70))), (list(range(7, 30)), list(range(60, 81)))]
    made: list[str] = []

    def make_cache(kv: str, hint: int) -> QuantKVCache:
        made.append(kv)
        method = BF16KVMethod(torch.float32) if kv in ("bf16", "copy") else get_kv_cache_method(kv)
        return QuantKVCache.for_model(model.config, method, capacity_hint=hint)

    shared = measure_fidelity(model, samples, make_cache, ["bf16", "nvfp4"])
    assert made == ["bf16", "nvfp4"] * 2
    separate = measure_fidelity(model, samples, make_cache, ["copy", "nvfp4"])
    assert shared["nvfp4"] == separate["nvfp4"]
    assert shared["bf16"] == separate["copy"]
    assert shared["bf16"].kl == 0.0 and shared["bf16"].top1 == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["bf16", "fp8", "nvfp4", "nvfp4_4over6", "blockfp4"])
def test_store_and_read_pair_is_two_store_and_reads(name: str, dtype: torch.dtype) -> None:
    """K and V in one pass (each with its own scale) give the bytes and values of two calls."""
    method = get_kv_cache_method(name)
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(5, H, D, generator=g) * 4).float()  # centered K arrives in fp32
    v = (torch.randn(5, H, D, generator=g) * 0.3).to(dtype)
    v[0, 0] = 0.0
    k_scale, v_scale = (torch.tensor(0.02), torch.tensor(0.003)) if method.uses_tensor_scale else (None, None)
    loc = torch.tensor([4, 0, 7, 2, 1])

    def buffers() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        made = method.create_buffers(8, H, D, 1, "cpu")
        scales = made["k_scale_buffer"], made["v_scale_buffer"]
        return (
            made["k_buffer"][0],
            scales[0][0] if scales[0] else None,
            made["v_buffer"][0],
            scales[1][0] if scales[1] else None,
        )

    one, two = buffers(), buffers()
    got = method.store_and_read_pair(one, loc, k, v, k_scale, v_scale, dtype)
    want = (
        method.store_and_read(two[0], two[1], loc, k, k_scale, dtype),
        method.store_and_read(two[2], two[3], loc, v, v_scale, dtype),
    )
    for a, b in zip(one, two):
        assert (a is None and b is None) or torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert all(torch.equal(x, y) for x, y in zip(got, want))
