"""Triton kernels vs the PyTorch reference, byte for byte, on CPU under ``TRITON_INTERPRET=1``.

The kernel module is loaded a second time, privately, with ``TRITON_INTERPRET=1`` set while this
module's tests run (Triton reads it when decorating and again when launching), so the interpreted
copy takes CPU tensors while the package's own kernels, imported first, stay compiled: nothing
else in the session (GPU tests included) is switched to the interpreter. The case generators
here are reused by ``tests/test_kernels_gpu.py`` at larger sizes.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from conftest import load_interpreted_kernels
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4kv_cli.quant import backend as backend_module
from fp4kv_cli.quant.backend import NVFP4_WRITERS, BackendUnavailableError, TorchBackend
from fp4kv_cli.quant.formats import E2M1_MAX, E4M3_MAX
from fp4kv_cli.quant.kernels import FlashInferBackend, TritonBackend

FORMATS = ("nvfp4", "nvfp4_4over6", "blockfp4")
#: The block layouts the readers decode (``nvfp4_4over6`` writes the ``nvfp4`` one).
READ_FORMATS = ("nvfp4", "blockfp4")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Exact E2M1 rounding ties (in units of the block scale).
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
#: Quantize launch variants (constants of the kernel module): every combination of the flags that
#: change the kernel's code path (a persistent grid of 2 programs: several row tiles each on CPU,
#: where the interpreter counts one SM), then each PTX cache hint the tuning sweep tries, which the
#: interpreter only checks for validity.
QUANTIZE_VARIANTS = [
    {"QUANTIZE_WIDE_STORE": wide, "QUANTIZE_WHOLE_LOAD": whole, "QUANTIZE_PROGRAMS_PER_SM": programs,
     "QUANTIZE_STAGES": 2 if programs else 1}
    for wide, whole, programs in itertools.product((False, True), (False, True), (0, 2))
] + [
    {"QUANTIZE_WIDE_STORE": True, "QUANTIZE_WHOLE_LOAD": True, name: value}
    for name, value in (("QUANTIZE_LOAD_CACHE", ".cg"), ("QUANTIZE_LOAD_EVICT", "evict_first"),
                        ("QUANTIZE_STORE_CACHE", ".cs"))
]  # fmt: skip
# The interpreter runs the kernels in numpy, which warns where IEEE arithmetic overflows on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
)


# --- inputs -------------------------------------------------------------------------------------


def amax_scale(x: torch.Tensor) -> torch.Tensor:
    """The calibrated NVFP4 global scale ``amax / (6 * 448)`` of ``x`` (finite part), 0-dim fp32."""
    finite = x.float()[torch.isfinite(x.float())]
    amax = finite.abs().max().item() if finite.numel() else 1.0
    return torch.tensor(max(amax, 1e-30) / (E2M1_MAX * E4M3_MAX), dtype=torch.float32)


def tie_blocks(rows: int, blocks: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 ``[rows, blocks * 16]`` whose blocks hold exact E2M1 ties in both formats with ``g = 1``.

    Each block has max ``6 * 2^k`` (k from -9, an E4M3 subnormal scale, to 8), so its NVFP4 scale
    is exactly ``2^k``, as is its UE8M0 scale; the other elements are ``+-tie * 2^k`` or ``+-0``.
    """
    k = torch.randint(-9, 9, (rows, blocks, 1), generator=gen).float()
    scale = torch.pow(2.0, k)
    choices = torch.tensor((0.0, *TIES, 6.0))
    pick = choices[torch.randint(0, len(choices), (rows, blocks, 16), generator=gen)]
    sign = torch.where(torch.rand(rows, blocks, 16, generator=gen) < 0.5, -1.0, 1.0)
    values = sign * pick * scale
    values[..., 0] = 6.0 * scale[..., 0]
    return values.reshape(rows, blocks * 16)


def special_rows() -> torch.Tensor:
    """fp32 ``[12, 32]``: zero and -0 blocks, subnormal/tiny/huge magnitudes, +-inf, mixed blocks."""
    tiny, huge = 1e-40, 3.0e38
    rows = [
        [0.0] * 32,
        [-0.0] * 16 + [0.0, -0.0] * 8,
        [1e-45, -1e-45, 2.8e-45, 4.2e-45] * 8,
        [tiny * (i + 1) * (-1) ** i for i in range(32)],
        [1.2e-38 * (i % 7) for i in range(32)],
        [huge * ((i % 5) - 2) / 2 for i in range(32)],
        [3.4028235e38, -3.4028235e38] * 16,
        [float("inf")] + [1.0] * 15 + [-float("inf")] + [-2.5] * 15,
        [1e30, 1e-30, -1e20, 7.0] * 8,
        [6.0 * 448 * (i + 1) for i in range(32)],
        [(i - 16) * 0.0625 for i in range(32)],
        [5e-3 * ((i % 3) - 1) for i in range(32)],
    ]
    return torch.tensor(rows, dtype=torch.float32)


def random_bits(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 ``[rows, cols]`` from uniform random bit patterns, NaN replaced by +-inf."""
    bits = torch.randint(-(2**31), 2**31 - 1, (rows, cols), generator=gen, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    return torch.where(torch.isnan(x), torch.copysign(torch.tensor(float("inf")), x), x)


def global_scales(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Global scales to try on ``x``: calibrated, 64x too small (saturating scales), 1 and 2^-10."""
    g = amax_scale(x)
    yield g
    yield g / 64
    yield torch.tensor(1.0)
    yield torch.tensor(2.0**-10)


# --- comparison ---------------------------------------------------------------------------------


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal shapes, dtypes and bit patterns, NaN positions equal (NaN payloads may differ)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    nan_got, nan_want = torch.isnan(got.float()), torch.isnan(want.float())
    assert torch.equal(nan_got, nan_want)
    bits = _BITS[got.element_size()]
    mismatch = (got.view(bits) != want.view(bits)) & ~nan_got
    assert not mismatch.any(), (
        f"{int(mismatch.sum())} elements differ, first at {mismatch.nonzero()[0].tolist()}"
    )


def check_quantize(backend: TorchBackend, fmt: str, x: torch.Tensor, g: torch.Tensor | None) -> None:
    """Kernel quantize == reference quantize, and kernel dequantize of those bytes == reference, per dtype."""
    reference = TorchBackend()
    want_packed, want_scales = reference.quantize(fmt, x, g)
    got_packed, got_scales = backend.quantize(fmt, x, g)
    assert torch.equal(got_scales, want_scales), f"{fmt} scale bytes differ"
    assert torch.equal(got_packed, want_packed), f"{fmt} packed bytes differ"
    for dtype in DTYPES:
        assert_same_bits(
            backend.dequantize(fmt, want_packed, want_scales, g, dtype),
            reference.dequantize(fmt, want_packed, want_scales, g, dtype),
        )


def fmt_scale(fmt: str, g: torch.Tensor) -> torch.Tensor | None:
    return g if fmt in NVFP4_WRITERS else None


# --- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernels() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield load_interpreted_kernels()


@pytest.fixture(scope="module")
def triton_backend(kernels: ModuleType) -> TorchBackend:
    assert kernels.INTERPRETED
    return kernels.TritonBackend()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_normal_matches_reference(triton_backend: TorchBackend, fmt: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    # 70 rows of 4 blocks: not a multiple of any tile's rows, so the last program is part-masked.
    x = (torch.randn(70, 64, generator=gen) * 3).to(dtype)
    check_quantize(triton_backend, fmt, x, fmt_scale(fmt, amax_scale(x)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_round_to_even_code(triton_backend: TorchBackend, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = tie_blocks(8, 4, gen).to(dtype)
    for fmt in FORMATS:
        check_quantize(triton_backend, fmt, x, fmt_scale(fmt, torch.tensor(1.0)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_match_reference(triton_backend: TorchBackend, dtype: torch.dtype) -> None:
    x = special_rows().to(dtype)
    check_quantize(triton_backend, "blockfp4", x, None)
    for g in global_scales(x):
        for fmt in NVFP4_WRITERS:
            check_quantize(triton_backend, fmt, x, g)


def test_subnormal_and_zero_e4m3_scales(triton_backend: TorchBackend) -> None:
    """Block maxima from 2^-13 to 2^-4 with g = 1: E4M3 scales subnormal or 0 (then r = 0)."""
    gen = torch.Generator().manual_seed(3)
    magnitude = torch.pow(2.0, torch.empty(16, 4, 1).uniform_(-13, -4, generator=gen))
    x = (torch.randn(16, 4, 16, generator=gen) * magnitude).reshape(16, 64)
    for fmt in NVFP4_WRITERS:
        check_quantize(triton_backend, fmt, x, torch.tensor(1.0))


@pytest.mark.parametrize("shape", [(1, 16), (5, 48), (2, 16 * 65)])
def test_odd_shapes(triton_backend: TorchBackend, shape: tuple[int, int]) -> None:
    """One block; 3 blocks a row (masked tile); 65 blocks a row (two column programs)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    for fmt in FORMATS:
        check_quantize(triton_backend, fmt, x, fmt_scale(fmt, amax_scale(x)))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    fmt=st.sampled_from(FORMATS),
    dtype=st.sampled_from(DTYPES),
    log2_g=st.floats(-40, 20),
)
def test_fuzz_random_bit_patterns(
    kernels: ModuleType, seed: int, fmt: str, dtype: torch.dtype, log2_g: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = random_bits(5, 48, gen).to(dtype)
    check_quantize(kernels.TritonBackend(), fmt, x, fmt_scale(fmt, torch.tensor(2.0**log2_g)))


@pytest.mark.parametrize("fmt", READ_FORMATS)
def test_dequantize_arbitrary_bytes(triton_backend: TorchBackend, fmt: str) -> None:
    """Every packed and scale byte value, NaN/inf/negative E4M3 scales and UE8M0 255 included."""
    packed = ((torch.arange(256 * 16) * 7) % 256).to(torch.uint8).reshape(256, 16)
    scales = (torch.arange(256 * 2) % 256).to(torch.uint8).reshape(256, 2)
    g = torch.tensor(0.37) if fmt == "nvfp4" else None
    reference = TorchBackend()
    for dtype in DTYPES:
        assert_same_bits(
            triton_backend.dequantize(fmt, packed, scales, g, dtype),
            reference.dequantize(fmt, packed, scales, g, dtype),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_store_and_gather_scattered_slots(
    triton_backend: TorchBackend, fmt: str, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(5)
    tokens, heads, dim, slots = 6, 3, 48, 16
    # A column slice of a wider tensor: token and head strides are not the packed ones.
    x = (torch.randn(tokens, heads, dim + 16, generator=gen) * 2).to(dtype)[:, :, 8 : 8 + dim]
    loc = torch.randperm(slots, generator=gen)[:tokens]
    g = fmt_scale(fmt, amax_scale(x))
    start_data = torch.randint(0, 256, (slots, heads, dim // 2), generator=gen, dtype=torch.uint8)
    start_scales = torch.randint(0, 256, (slots, heads, dim // 16), generator=gen, dtype=torch.uint8)
    buffers = {}
    for name, backend in (("kernel", triton_backend), ("reference", TorchBackend())):
        data, scales = start_data.clone(), start_scales.clone()
        backend.quantize_and_store(fmt, data, scales, loc, x, g)
        buffers[name] = (data, scales)
    assert torch.equal(buffers["kernel"][0], buffers["reference"][0])
    assert torch.equal(buffers["kernel"][1], buffers["reference"][1])

    data, scales = buffers["reference"]
    gather = torch.tensor([loc[3], 0, loc[3], 15, loc[0]])
    for where in (gather, None):
        assert_same_bits(
            triton_backend.dequantize_gather(fmt, data, scales, where, g, dtype),
            TorchBackend().dequantize_gather(fmt, data, scales, where, g, dtype),
        )


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_readback_kernels_match_the_reference(triton_backend: TorchBackend, fmt: str) -> None:
    """The kernels' store + read back (one tensor, and K and V as a pair with their own global
    scales) write the reference's bytes and return its values."""
    gen = torch.Generator().manual_seed(9)
    tokens, heads, dim, slots = 5, 2, 32, 12
    k = torch.randn(tokens, heads, dim, generator=gen) * 3
    v = (torch.randn(tokens, heads, dim, generator=gen) * 0.2).to(torch.bfloat16)
    loc = torch.randperm(slots, generator=gen)[:tokens]
    gk, gv = fmt_scale(fmt, amax_scale(k)), fmt_scale(fmt, amax_scale(v.float()))
    out = {}
    for name, backend in (("kernel", triton_backend), ("reference", TorchBackend())):
        bufs = tuple(
            torch.zeros(slots, heads, width, dtype=torch.uint8) for width in (dim // 2, dim // 16) * 2
        )
        single = backend.quantize_store_readback(fmt, bufs[0], bufs[1], loc, k, gk, torch.float32)
        pair = backend.quantize_store_readback_pair(fmt, bufs, loc, k, v, gk, gv, torch.float32)
        out[name] = (bufs, single, pair)
    kernel, reference = out["kernel"], out["reference"]
    assert all(torch.equal(a, b) for a, b in zip(kernel[0], reference[0]))
    assert_same_bits(kernel[1], reference[1])
    for a, b in zip(kernel[2], reference[2]):
        assert_same_bits(a, b)


def four_over_six_blocks() -> torch.Tensor:
    """fp32 ``[6, 16]``: the constructed 4-vs-6 blocks of tests/test_quant_reference.py (g = 1)."""
    rows = [
        [6.0] + [5.0] * 15,
        [6.0, 3.0, 1.5, 0.5, -3.0],
        [6.0, -3.0, 1.5],
        [6.0, 3.0, 1.5, 0.75],
        [2.5 * 2.0**-9, 2.0**-10],
        [6.0 * 448, 17.0],
    ]
    return torch.tensor([row + [0.0] * (16 - len(row)) for row in rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_4over6_choice_cases_match_reference(triton_backend: TorchBackend, dtype: torch.dtype) -> None:
    """The kernel takes the reference's 4-vs-6 decision on the constructed blocks (both grids'
    rounding ties, exact ties, an underflowing and a saturating candidate) and on tie blocks,
    and writes the same bytes into scattered cache slots."""
    gen = torch.Generator().manual_seed(8)
    x = torch.cat([four_over_six_blocks(), tie_blocks(6, 1, gen)]).to(dtype)
    check_quantize(triton_backend, "nvfp4_4over6", x, torch.tensor(1.0))
    check_quantize(triton_backend, "nvfp4_4over6", x * 3, torch.tensor(0.37))
    rows = x.reshape(4, 3, 16)
    loc = torch.tensor([5, 0, 7, 2])
    stored = []
    for backend in (triton_backend, TorchBackend()):
        data = torch.zeros(8, 3, 8, dtype=torch.uint8)
        scales = torch.zeros(8, 3, 1, dtype=torch.uint8)
        backend.quantize_and_store("nvfp4_4over6", data, scales, loc, rows, torch.tensor(1.0))
        stored.append((data, scales))
    assert all(torch.equal(a, b) for a, b in zip(*stored))


def _variant_id(variant: dict[str, object]) -> str:
    return "-".join(f"{name.removeprefix('QUANTIZE_').lower()}={value}" for name, value in variant.items())


@pytest.fixture(params=QUANTIZE_VARIANTS, ids=_variant_id)
def variant_backend(kernels: ModuleType, request: pytest.FixtureRequest) -> Iterator[TorchBackend]:
    """The interpreted backend with one quantize launch variant's constants set."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in request.param.items():
            assert hasattr(kernels, name)
            patch.setattr(kernels, name, value)
        yield kernels.TritonBackend()


def variant_cases() -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(fmt, x, g)``: exact ties, the special rows under every global scale (saturation, -0,
    subnormals, +-inf), E4M3 subnormal and zero scales, masked tiles and two column programs."""
    gen = torch.Generator().manual_seed(6)
    for dtype in DTYPES:
        ties = tie_blocks(8, 4, gen).to(dtype)
        special = special_rows().to(dtype)
        yield "blockfp4", ties, None
        yield "nvfp4", ties, torch.tensor(1.0)
        yield "blockfp4", special, None
        for g in global_scales(special):
            yield "nvfp4", special, g
    magnitude = torch.pow(2.0, torch.empty(16, 4, 1).uniform_(-13, -4, generator=gen))
    yield "nvfp4", (torch.randn(16, 4, 16, generator=gen) * magnitude).reshape(16, 64), torch.tensor(1.0)
    for shape in ((70, 64), (2, 16 * 65)):
        x = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        for fmt in FORMATS:
            yield fmt, x, fmt_scale(fmt, amax_scale(x))


def test_quantize_variant_matches_reference(variant_backend: TorchBackend) -> None:
    reference = TorchBackend()
    for fmt, x, g in variant_cases():
        got_packed, got_scales = variant_backend.quantize(fmt, x, g)
        want_packed, want_scales = reference.quantize(fmt, x, g)
        assert torch.equal(got_scales, want_scales), f"{fmt} {x.dtype} scale bytes differ"
        assert torch.equal(got_packed, want_packed), f"{fmt} {x.dtype} packed bytes differ"


class LaunchRecorder:
    """Stands in for a kernel: records each launch's keyword arguments, then launches the kernel."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.launches: list[dict[str, object]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        def launch(*args: object, **kwargs: object) -> None:
            self.launches.append(kwargs)
            self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("aligned", [True, False], ids=["int64-view", "byte-fallback"])
def test_quantize_variant_stores_at_scattered_slots(
    variant_backend: TorchBackend, kernels: ModuleType, monkeypatch: pytest.MonkeyPatch, aligned: bool
) -> None:
    """Fused store into buffer rows an int64 view can address, and into rows 4 bytes off 8-byte
    alignment, where the wide store falls back to byte stores: bytes equal the reference."""
    gen = torch.Generator().manual_seed(7)
    tokens, heads, dim, slots = 6, 3, 48, 16
    x = (torch.randn(tokens, heads, dim + 16, generator=gen) * 2).to(torch.bfloat16)[:, :, 8 : 8 + dim]
    loc = torch.randperm(slots, generator=gen)[:tokens]
    offset = 0 if aligned else 4
    start_data = torch.randint(0, 256, (slots, heads, offset + dim // 2), generator=gen, dtype=torch.uint8)
    start_scales = torch.randint(0, 256, (slots, heads, dim // 16), generator=gen, dtype=torch.uint8)
    recorder = LaunchRecorder(kernels._quantize_kernel)
    monkeypatch.setattr(kernels, "_quantize_kernel", recorder)
    for fmt in FORMATS:
        g = fmt_scale(fmt, amax_scale(x))
        buffers = []
        for backend in (variant_backend, TorchBackend()):
            data, scales = start_data.clone()[:, :, offset:], start_scales.clone()
            backend.quantize_and_store(fmt, data, scales, loc, x, g)
            buffers.append((data, scales))
        assert torch.equal(buffers[0][0], buffers[1][0]), f"{fmt} packed bytes differ"
        assert torch.equal(buffers[0][1], buffers[1][1]), f"{fmt} scale bytes differ"
    wide = aligned and kernels.QUANTIZE_WIDE_STORE
    assert [launch["WIDE_STORE"] for launch in recorder.launches] == [wide] * len(FORMATS)


def test_nvfp4_needs_global_scale(triton_backend: TorchBackend) -> None:
    with pytest.raises(ValueError, match="global scale"):
        triton_backend.quantize("nvfp4", torch.ones(1, 16), None)


def test_registration_and_device_support() -> None:
    assert backend_module.BACKENDS["triton"] is TritonBackend
    assert backend_module.BACKENDS["flashinfer"] is FlashInferBackend
    assert not TritonBackend().supports(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert backend_module.get_backend("cpu").name == "torch"


def test_forced_triton_on_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FP4KV_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="FP4KV_BACKEND=triton cannot run on cpu"):
        backend_module.get_backend("cpu")


@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is not None, reason="flashinfer is installed")
def test_flashinfer_missing_is_a_clear_error() -> None:
    with pytest.raises(BackendUnavailableError, match="pip install flashinfer-python"):
        FlashInferBackend()
