"""Quant methods: buffers, cell sizes, store/read through slots, scales, centering, registry."""

from __future__ import annotations

import pytest
import torch

from fp4kv_cli.analysis.round_trip import HeadSubsetMethod
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant import (
    FP4_KV_CACHE_QUANT_REGISTRY,
    KV_CACHE_METHOD_REGISTRY,
    BlockFP4KVMethod,
    BlockFP4KVQuantizeUtil,
    NVFP4KVMethod,
    NVFP4KVQuantizeUtil,
    get_fp4_kv_cache_quant_method,
    get_kv_cache_method,
)
from fp4kv_cli.quant.reference import (
    blockfp4_quantize_reference,
    nvfp4_dequantize_reference,
    nvfp4_quantize_reference,
)


def test_registry_names_and_unknown_name_lists_known() -> None:
    assert set(FP4_KV_CACHE_QUANT_REGISTRY) == {"nvfp4", "nvfp4_4over6", "blockfp4"}
    assert set(KV_CACHE_METHOD_REGISTRY) == {"bf16", "fp8", "nvfp4", "nvfp4_4over6", "blockfp4"}
    assert isinstance(get_fp4_kv_cache_quant_method("NVFP4"), NVFP4KVMethod)
    with pytest.raises(FP4KVError, match="known: nvfp4, nvfp4_4over6, blockfp4"):
        get_fp4_kv_cache_quant_method("fp8")
    with pytest.raises(FP4KVError, match="known: bf16, fp8, nvfp4, nvfp4_4over6, blockfp4"):
        get_kv_cache_method("int4")


@pytest.mark.parametrize("name", ["nvfp4", "blockfp4"])
def test_fp4_buffer_shapes(name: str) -> None:
    buffers = get_fp4_kv_cache_quant_method(name).create_buffers(10, 2, 128, 3, "cpu")
    assert set(buffers) == {"k_buffer", "v_buffer", "k_scale_buffer", "v_scale_buffer"}
    assert len(buffers["k_buffer"]) == 3
    assert buffers["k_buffer"][0].shape == (10, 2, 64) and buffers["k_buffer"][0].dtype == torch.uint8
    assert buffers["v_scale_buffer"][2].shape == (10, 2, 8) and buffers["v_scale_buffer"][2].dtype == torch.uint8


@pytest.mark.parametrize(
    ("name", "cell"),
    # Qwen2.5-1.5B: 28 layers, 2 KV heads, head_dim 128; FP4 = (64 + 8) bytes per head.
    [("bf16", 28672), ("fp8", 14336), ("nvfp4", 8064), ("nvfp4_4over6", 8064), ("blockfp4", 8064)],
)
def test_compute_cell_size(name: str, cell: int) -> None:
    assert get_kv_cache_method(name).compute_cell_size(2, 128, 28, 2) == cell


def test_fp4_cell_size_is_0_5625_of_a_byte_per_element() -> None:
    nv = NVFP4KVMethod().compute_cell_size(8, 64, 4, 1)
    bf = get_kv_cache_method("bf16").compute_cell_size(8, 64, 4, 1)
    assert nv / bf == 0.5625 / 2


def test_fp4_refuses_head_dim_not_multiple_of_16() -> None:
    with pytest.raises(FP4KVError, match="head_dim divisible by 16"):
        BlockFP4KVMethod().create_buffers(4, 1, 24, 1, "cpu")


def test_nvfp4_store_writes_only_given_slots_and_matches_reference() -> None:
    method = NVFP4KVMethod()
    buffers = method.create_buffers(8, 2, 32, 1, "cpu")
    k = torch.randn(3, 2, 32, dtype=torch.bfloat16)
    v = torch.randn(3, 2, 32, dtype=torch.bfloat16)
    loc = torch.tensor([6, 1, 4])
    method.quantize_and_store(
        buffers["k_buffer"][0], buffers["v_buffer"][0], buffers["k_scale_buffer"][0],
        buffers["v_scale_buffer"][0], loc, k, v, k_scale=0.01, v_scale=0.02,
    )  # fmt: skip
    ref_packed, ref_scales = nvfp4_quantize_reference(k.reshape(6, 32), 0.01)
    assert torch.equal(buffers["k_buffer"][0][loc].reshape(6, 16), ref_packed)
    assert torch.equal(buffers["k_scale_buffer"][0][loc].reshape(6, 2), ref_scales)
    untouched = torch.tensor([0, 2, 3, 5, 7])
    assert buffers["k_buffer"][0][untouched].eq(0).all()
    out = method.dequantize(buffers["v_buffer"][0], buffers["v_scale_buffer"][0], loc, 0.02)
    v_ref = nvfp4_dequantize_reference(*nvfp4_quantize_reference(v.reshape(6, 32), 0.02), 0.02)
    assert torch.equal(out.reshape(6, 32), v_ref)


def test_nvfp4_needs_global_scale() -> None:
    method = NVFP4KVMethod()
    b = method.create_buffers(2, 1, 16, 1, "cpu")
    x = torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="global scale"):
        method.quantize_and_store(b["k_buffer"][0], b["v_buffer"][0], b["k_scale_buffer"][0],
                                  b["v_scale_buffer"][0], torch.tensor([0]), x, x)  # fmt: skip


def test_fp8_output_of_nvfp4_uses_six_g_scale() -> None:
    method = NVFP4KVMethod()
    b = method.create_buffers(4, 1, 16, 1, "cpu")
    x = torch.linspace(-3, 3, 16).reshape(1, 1, 16)
    g = 3.0 / 2688
    loc = torch.tensor([2])
    method.quantize_and_store(b["k_buffer"][0], b["v_buffer"][0], b["k_scale_buffer"][0],
                              b["v_scale_buffer"][0], loc, x, x, g, g)  # fmt: skip
    fp8 = method.dequantize(b["k_buffer"][0], b["k_scale_buffer"][0], loc, g, dtype=torch.float8_e4m3fn)
    full = method.dequantize(b["k_buffer"][0], b["k_scale_buffer"][0], loc, g, dtype=torch.float32)
    assert fp8.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(fp8.float() * (6 * g), full, rtol=2**-3, atol=0)


def test_utils_match_reference() -> None:
    x = torch.randn(5, 64, dtype=torch.float16)
    packed, scales = NVFP4KVQuantizeUtil.quantize(x, 0.004)
    ref = nvfp4_quantize_reference(x, 0.004)
    assert torch.equal(packed, ref[0]) and torch.equal(scales, ref[1])
    assert NVFP4KVQuantizeUtil.dequantize(packed, scales, 0.004, torch.float16).dtype == torch.float16
    packed, scales = BlockFP4KVQuantizeUtil.quantize(x)
    assert torch.equal(packed, blockfp4_quantize_reference(x)[0])


def scales_dict(k_amax: list[float], v_amax: list[float], offsets: list | None = None) -> dict:
    layers = []
    for i, (k, v) in enumerate(zip(k_amax, v_amax)):
        entry = {"index": i, "k_amax": k, "v_amax": v}
        if offsets is not None:
            entry["k_offset"] = offsets[i]
        layers.append(entry)
    return {"schema": "fp4kv.scales", "version": 1, "layers": layers}


def test_load_scales_conventions_per_method() -> None:
    data = scales_dict([2688.0, 448.0], [896.0, 44.8])
    nv = NVFP4KVMethod().load_scales(data)
    assert nv.k.tolist() == [1.0, pytest.approx(1 / 6)]
    fp8 = get_kv_cache_method("fp8").load_scales(data)
    assert fp8.k.tolist() == [6.0, 1.0] and fp8.v[1].item() == pytest.approx(0.1)
    assert BlockFP4KVMethod().load_scales(data) is None


def test_scale_from_amax_is_per_tensor() -> None:
    nvfp4 = NVFP4KVMethod().scale_from_amax(2688.0)
    assert nvfp4.shape == () and nvfp4.dtype == torch.float32 and float(nvfp4) == 1.0
    subset = HeadSubsetMethod(NVFP4KVMethod(), [0]).scale_from_amax(torch.tensor([2688.0, 5376.0]))
    assert subset.tolist() == [1.0, 2.0]
    fp8 = get_kv_cache_method("fp8").scale_from_amax(torch.tensor([448.0, 896.0]))
    assert fp8.dtype == torch.float32 and fp8.tolist() == [1.0, 2.0]
    assert BlockFP4KVMethod().scale_from_amax(1.0) is None
    assert get_kv_cache_method("bf16").scale_from_amax(1.0) is None

    class Unscaled(BlockFP4KVMethod):
        uses_tensor_scale = True  # claims a tensor scale but never says how to make one

    with pytest.raises(NotImplementedError, match="Unscaled uses a tensor scale"):
        Unscaled().scale_from_amax(1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), None])
def test_load_scales_refuses_bad_amax(bad: float | None) -> None:
    with pytest.raises(FP4KVError, match="k_amax"):
        NVFP4KVMethod().load_scales(scales_dict([bad], [1.0]))


def test_k_offset_is_subtracted_before_quantization() -> None:
    method = get_kv_cache_method("bf16", dtype=torch.float32)
    b = method.create_buffers(2, 2, 16, 1, "cpu")
    k = torch.randn(2, 2, 16)
    mu = torch.randn(2, 16)
    method.quantize_and_store(b["k_buffer"][0], b["v_buffer"][0], None, None, torch.tensor([0, 1]), k, k,
                              k_offset=mu)  # fmt: skip
    torch.testing.assert_close(b["k_buffer"][0], k - mu)
    torch.testing.assert_close(b["v_buffer"][0], k)


def test_load_k_offsets() -> None:
    offsets = [[[0.5] * 16] * 2, [[-1.0] * 16] * 2]
    loaded = NVFP4KVMethod.load_k_offsets(scales_dict([1.0, 1.0], [1.0, 1.0], offsets))
    assert loaded.shape == (2, 2, 16) and loaded[1, 0, 0].item() == -1.0
    assert NVFP4KVMethod.load_k_offsets(scales_dict([1.0], [1.0])) is None


def test_centering_leaves_attention_unchanged_with_causal_and_padding_masks() -> None:
    """softmax(q (K - mu)^T) == softmax(q K^T): a per-channel offset shifts every score of a query
    by the same q . mu. Checked with causal and left-padding masks, GQA layout [B, H, T, D]."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, t, d = 2, 2, 7, 16
    q = torch.randn(batch, heads, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, heads, t, d, generator=gen, dtype=torch.float64) + 5.0
    v = torch.randn(batch, heads, t, d, generator=gen, dtype=torch.float64)
    mu = k.mean(dim=(0, 2), keepdim=True)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    padding = torch.ones(batch, t, dtype=torch.bool)
    padding[1, :3] = False  # left padding of the second row
    mask = causal[None, None] & padding[:, None, None, :]
    mask[1, :, :3, 0] = True  # padded query rows see something, as transformers does
    sdpa = torch.nn.functional.scaled_dot_product_attention
    plain = sdpa(q, k, v, attn_mask=mask)
    centered = sdpa(q, k - mu, v, attn_mask=mask)
    torch.testing.assert_close(centered, plain, rtol=1e-10, atol=1e-10)


def test_every_method_reads_the_layout_the_backend_maps_it_to() -> None:
    """One writer -> reader mapping (:data:`FP4_LAYOUTS`): the methods' ``layout`` and the
    backend's reader agree on it (a 4-over-6 buffer read under its writer name is nvfp4's read)."""
    from fp4kv_cli.quant.backend import FP4_LAYOUTS, TorchBackend, read_layout
    from fp4kv_cli.quant.registry import KV_CACHE_METHOD_REGISTRY

    assert FP4_LAYOUTS["nvfp4_4over6"] == "nvfp4"
    for name in KV_CACHE_METHOD_REGISTRY:
        assert get_kv_cache_method(name).layout == read_layout(name)
    gen = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (4, 32), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 127, (4, 4), dtype=torch.uint8, generator=gen)
    g = torch.tensor(0.5)
    for writer, layout in FP4_LAYOUTS.items():
        scale = g if layout == "nvfp4" else None
        got = TorchBackend().dequantize(writer, packed, scales, scale, torch.float32)
        assert torch.equal(got, TorchBackend().dequantize(layout, packed, scales, scale, torch.float32))


def test_4over6_method_stores_its_bytes_and_reads_as_nvfp4() -> None:
    """The nvfp4_4over6 method writes the 4-over-6 writer's bytes into nvfp4-shaped buffers, takes
    nvfp4's scales, and its read path is the nvfp4 reader's (same values from the same bytes)."""
    from fp4kv_cli.quant.reference import nvfp4_4over6_quantize_reference

    method, plain = get_kv_cache_method("nvfp4_4over6"), NVFP4KVMethod()
    assert method.layout == "nvfp4" and plain.layout == "nvfp4"
    assert torch.equal(method.scale_from_amax([3.0, 5.0]), plain.scale_from_amax([3.0, 5.0]))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 64, generator=gen) * torch.logspace(-1, 1, 64)
    g = torch.tensor(float(x.abs().max()) / 2688)
    buffers = method.create_buffers(8, 2, 64, 1, "cpu")
    data, scales = buffers["k_buffer"][0], buffers["k_scale_buffer"][0]
    loc = torch.tensor([7, 1, 3, 0, 5, 2])
    method.store(data, scales, loc, x, g)
    packed, block_scales = nvfp4_4over6_quantize_reference(x.reshape(12, 64), g)
    assert torch.equal(data[loc].reshape(12, 32), packed)
    assert torch.equal(scales[loc].reshape(12, 4), block_scales)
    assert torch.equal(method.dequantize(data, scales, loc, g), plain.dequantize(data, scales, loc, g))
    assert not torch.equal(block_scales, nvfp4_quantize_reference(x.reshape(12, 64), g)[1])
