"""Triton (and FlashInfer) FP4 kernels on a CUDA GPU vs the PyTorch reference run on CPU, byte for byte.

Larger shapes than the interpreted CPU tests, a hypothesis fuzzer, the fused cache store/gather
at scattered slots, a no-host-sync check, and FlashInfer's ``nvfp4_kv_dequantize`` decoding our
bytes when flashinfer is installed. Skipped without CUDA.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels_triton import (
    DTYPES,
    FORMATS,
    READ_FORMATS,
    amax_scale,
    assert_same_bits,
    fmt_scale,
    four_over_six_blocks,
    global_scales,
    random_bits,
    special_rows,
    tie_blocks,
)

from fp4kv_cli.quant.backend import TorchBackend, get_backend
from fp4kv_cli.quant.kernels import FlashInferBackend, TritonBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
        reason="needs a SM80+ CUDA GPU",
    ),
]
HAS_FLASHINFER = importlib.util.find_spec("flashinfer") is not None
CUDA = torch.device("cuda")


def on_gpu(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else g.to(CUDA)


def check_against_cpu_reference(fmt: str, x: torch.Tensor, g: torch.Tensor | None) -> None:
    """Triton on the GPU == reference on CPU: quantize bytes, and dequantize of them per dtype."""
    backend, reference = TritonBackend(), TorchBackend()
    want_packed, want_scales = reference.quantize(fmt, x, g)
    got_packed, got_scales = backend.quantize(fmt, x.to(CUDA), on_gpu(g))
    assert torch.equal(got_scales.cpu(), want_scales), f"{fmt} scale bytes differ"
    assert torch.equal(got_packed.cpu(), want_packed), f"{fmt} packed bytes differ"
    for dtype in DTYPES:
        got = backend.dequantize(fmt, want_packed.to(CUDA), want_scales.to(CUDA), on_gpu(g), dtype)
        assert_same_bits(got.cpu(), reference.dequantize(fmt, want_packed, want_scales, g, dtype))


def test_triton_is_the_automatic_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FP4KV_BACKEND", raising=False)
    assert TritonBackend().supports(CUDA)
    assert get_backend(CUDA).name == "triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_normal_large(fmt: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(4096, 1024, generator=gen) * 5).to(dtype)
    check_against_cpu_reference(fmt, x, fmt_scale(fmt, amax_scale(x)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_large(dtype: torch.dtype) -> None:
    x = tie_blocks(2048, 64, torch.Generator().manual_seed(12)).to(dtype)
    for fmt in FORMATS:
        check_against_cpu_reference(fmt, x, fmt_scale(fmt, torch.tensor(1.0)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_tiled(dtype: torch.dtype) -> None:
    x = special_rows().repeat(64, 8).to(dtype)
    check_against_cpu_reference("blockfp4", x, None)
    for g in global_scales(x):
        check_against_cpu_reference("nvfp4", x, g)
        check_against_cpu_reference("nvfp4_4over6", x, g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_4over6_choice_cases_tiled(dtype: torch.dtype) -> None:
    """The constructed 4-vs-6 blocks (rounding ties of both grids, exact ties, underflow,
    saturation) and tie blocks, tiled over many rows: the GPU kernel takes the reference's choice."""
    x = torch.cat(
        [four_over_six_blocks().repeat(512, 4), tie_blocks(3072, 4, torch.Generator().manual_seed(15))]
    )
    for g in (torch.tensor(1.0), torch.tensor(0.37), amax_scale(x)):
        check_against_cpu_reference("nvfp4_4over6", x.to(dtype), g)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 600),
    blocks=st.integers(1, 80),
    kind=st.sampled_from(("bits", "normal", "ties")),
    fmt=st.sampled_from(FORMATS),
    dtype=st.sampled_from(DTYPES),
    log2_g=st.one_of(st.none(), st.floats(-60, 40)),
)
def test_fuzz(
    seed: int, rows: int, blocks: int, kind: str, fmt: str, dtype: torch.dtype, log2_g: float | None
) -> None:
    gen = torch.Generator().manual_seed(seed)
    if kind == "bits":
        x = random_bits(rows, blocks * 16, gen)
    elif kind == "normal":
        magnitude = torch.pow(10.0, torch.empty(rows, blocks, 1).uniform_(-40, 38, generator=gen))
        x = (torch.randn(rows, blocks, 16, generator=gen) * magnitude).reshape(rows, blocks * 16)
    else:
        x = tie_blocks(rows, blocks, gen)
    x = x.to(dtype)
    g = amax_scale(x) if log2_g is None else torch.tensor(2.0**log2_g)
    check_against_cpu_reference(fmt, x, fmt_scale(fmt, g))


@pytest.mark.parametrize("fmt", READ_FORMATS)
def test_dequantize_every_byte(fmt: str) -> None:
    gen = torch.Generator().manual_seed(13)
    packed = torch.randint(0, 256, (8192, 64), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 256, (8192, 8), generator=gen, dtype=torch.uint8)
    g = torch.tensor(0.0173) if fmt == "nvfp4" else None
    for dtype in DTYPES:
        got = TritonBackend().dequantize(fmt, packed.to(CUDA), scales.to(CUDA), on_gpu(g), dtype)
        assert_same_bits(got.cpu(), TorchBackend().dequantize(fmt, packed, scales, g, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_store_and_gather(fmt: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(14)
    tokens, heads, dim, slots = 3000, 8, 128, 10000
    x = (torch.randn(tokens, heads, dim + 32, generator=gen) * 3).to(dtype)[:, :, 16 : 16 + dim]
    loc = torch.randperm(slots, generator=gen)[:tokens]
    g = fmt_scale(fmt, amax_scale(x))
    data = torch.randint(0, 256, (slots, heads, dim // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 256, (slots, heads, dim // 16), generator=gen, dtype=torch.uint8)
    gpu_data, gpu_scales = data.to(CUDA), scales.to(CUDA)
    TorchBackend().quantize_and_store(fmt, data, scales, loc, x, g)
    TritonBackend().quantize_and_store(fmt, gpu_data, gpu_scales, loc.to(CUDA), x.to(CUDA), on_gpu(g))
    assert torch.equal(gpu_data.cpu(), data)
    assert torch.equal(gpu_scales.cpu(), scales)
    gather = torch.randint(0, slots, (5000,), generator=gen)
    for where in (gather, None):
        got = TritonBackend().dequantize_gather(
            fmt, gpu_data, gpu_scales, None if where is None else where.to(CUDA), on_gpu(g), dtype
        )
        assert_same_bits(got.cpu(), TorchBackend().dequantize_gather(fmt, data, scales, where, g, dtype))


def test_global_scale_is_read_on_device_without_sync() -> None:
    x = torch.randn(64, 8, 128, device=CUDA, dtype=torch.bfloat16)
    g = x.abs().amax().float() / (6 * 448)
    data = torch.zeros(128, 8, 64, dtype=torch.uint8, device=CUDA)
    scales = torch.zeros(128, 8, 8, dtype=torch.uint8, device=CUDA)
    loc = torch.arange(64, device=CUDA) * 2
    backend = TritonBackend()
    backend.quantize_and_store("nvfp4", data, scales, loc, x, g)  # compile outside the check
    backend.dequantize_gather("nvfp4", data, scales, loc, g, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        backend.quantize_and_store("nvfp4", data, scales, loc, x, g)
        backend.dequantize_gather("nvfp4", data, scales, loc, g, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_reference_is_device_independent_on_normal_data() -> None:
    """The PyTorch reference gives the same bytes on CPU and GPU for ordinary data, so the
    benchmark's GPU-side bit-exactness check is meaningful."""
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(1024, 256, generator=gen) * 4
    reference = TorchBackend()
    for fmt in FORMATS:
        g = fmt_scale(fmt, amax_scale(x))
        cpu_bytes = reference.quantize(fmt, x, g)
        gpu_bytes = reference.quantize(fmt, x.to(CUDA), on_gpu(g))
        assert all(torch.equal(c, gb.cpu()) for c, gb in zip(cpu_bytes, gpu_bytes, strict=True))


@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_flashinfer_dequantize_reads_our_bytes(dtype: torch.dtype) -> None:
    import flashinfer

    gen = torch.Generator().manual_seed(16)
    x = (torch.randn(8192, 128, generator=gen) * 2).to(torch.bfloat16)
    g = amax_scale(x)
    packed, scales = TritonBackend().quantize("nvfp4", x.to(CUDA), g.to(CUDA))
    theirs = flashinfer.nvfp4_kv_dequantize(packed, scales, g.to(CUDA).reshape(1), output_dtype=dtype)
    ours = TritonBackend().dequantize("nvfp4", packed, scales, g.to(CUDA), dtype)
    assert_same_bits(theirs.cpu(), ours.cpu())
    assert_same_bits(ours.cpu(), TorchBackend().dequantize("nvfp4", packed.cpu(), scales.cpu(), g, dtype))


@pytest.mark.skipif(not HAS_FLASHINFER, reason="flashinfer is not installed")
def test_flashinfer_backend_matches_reference() -> None:
    """Natively decoded (SM80+) or falling back to Triton (encode below SM100), same bytes."""
    backend = FlashInferBackend()
    x = (torch.randn(4096, 256, generator=torch.Generator().manual_seed(17)) * 3).to(torch.bfloat16)
    for fmt in FORMATS:
        g = fmt_scale(fmt, amax_scale(x))
        want = TorchBackend().quantize(fmt, x, g)
        got = backend.quantize(fmt, x.to(CUDA), on_gpu(g))
        if torch.cuda.get_device_capability() < (10, 0):  # FlashInfer's SM100 encoder uses approximate rcp
            assert all(torch.equal(w, gb.cpu()) for w, gb in zip(want, got, strict=True))
        for dtype in DTYPES:
            out = backend.dequantize(fmt, want[0].to(CUDA), want[1].to(CUDA), on_gpu(g), dtype)
            assert_same_bits(out.cpu(), TorchBackend().dequantize(fmt, *want, g, dtype))
