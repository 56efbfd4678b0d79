"""Golden vectors and properties of the reference NVFP4 / BlockFP4 / FP8 quantizers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp4kv_cli.quant import NVFP4KVMethod
from fp4kv_cli.quant.formats import (
    e2m1_decode,
    e2m1_encode,
    e4m3_decode,
    e4m3_encode_satfinite,
    pack_nibbles,
    ue8m0_encode,
    unpack_nibbles,
)
from fp4kv_cli.quant.reference import (
    blockfp4_dequantize_reference,
    blockfp4_quantize_reference,
    check_global_scale,
    fp8_dequantize_reference,
    fp8_quantize_reference,
    nvfp4_4over6_quantize_reference,
    nvfp4_dequantize_reference,
    nvfp4_quantize_reference,
)


def codes_of(packed: torch.Tensor) -> list[int]:
    return unpack_nibbles(packed).flatten().tolist()


# --- E2M1 rounding: every boundary, tie, sign and saturation, written by hand -------------------

E2M1_GOLDEN = [
    # (value, expected code)
    (0.0, 0), (0.24, 0), (0.25, 0), (0.2500001, 1), (0.5, 1),
    (0.7499999, 1), (0.75, 2), (1.0, 2), (1.25, 2), (1.2500001, 3), (1.5, 3),
    (1.7499999, 3), (1.75, 4), (2.0, 4), (2.5, 4), (2.5000002, 5), (3.0, 5),
    (3.4999998, 5), (3.5, 6), (4.0, 6), (5.0, 6), (5.0000005, 7), (6.0, 7), (6.5, 7), (1e30, 7),
    (math.inf, 7),
    (-0.25, 8), (-0.1, 8), (-0.75, 10), (-1.75, 12), (-3.5, 14), (-5.0, 14), (-7.0, 15), (-math.inf, 15),
]  # fmt: skip


@pytest.mark.parametrize(("value", "code"), E2M1_GOLDEN)
def test_e2m1_rounding_golden(value: float, code: int) -> None:
    assert e2m1_encode(torch.tensor([value], dtype=torch.float32)).item() == code


def test_e2m1_negative_zero_keeps_sign() -> None:
    assert e2m1_encode(torch.tensor([-0.0])).item() == 8
    assert e2m1_decode(torch.tensor([8], dtype=torch.uint8)).item() == 0.0


def test_pack_low_nibble_is_even_element() -> None:
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_nibbles(packed), codes)


def test_e4m3_saturates_and_rounds_to_even() -> None:
    values = torch.tensor([448.0, 460.0, 464.0, 1e9, 1.0625, 1.1875, 2.0**-9, 2.0**-10, 2.0**-8])
    decoded = e4m3_decode(e4m3_encode_satfinite(values)).tolist()
    # 1.0625 ties between 1.0 and 1.125 -> even mantissa 1.0; 1.1875 -> 1.25 (even).
    # 2^-9 is the smallest subnormal; 2^-10 ties to 0 (even).
    assert decoded == [448.0, 448.0, 448.0, 448.0, 1.0, 1.25, 2.0**-9, 0.0, 2.0**-8]


# --- NVFP4 golden blocks --------------------------------------------------------------------

def block(*values: float) -> torch.Tensor:
    padded = list(values) + [0.0] * (16 - len(values))
    return torch.tensor([padded], dtype=torch.float32)


def test_nvfp4_unit_scale_block_golden() -> None:
    # bmax 6 with g = 1: sf = e4m3(6 * fp32(1/6)) = 1.0 (byte 0x38), r = 1, codes are the E2M1 rounding.
    x = block(6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, -6.0, 0.2500001, -2.5000002)
    packed, scales = nvfp4_quantize_reference(x, 1.0)
    assert scales.tolist() == [[0x38]]
    assert codes_of(packed) == [7, 0, 2, 2, 4, 4, 6, 6, 8, 15, 1, 13, 0, 0, 0, 0]
    out = nvfp4_dequantize_reference(packed, scales, 1.0, torch.float32)
    assert out[0, :12].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -6.0, 0.5, -3.0]


def test_nvfp4_scale_rounding_then_saturation() -> None:
    # bmax 6.375: sf = 1.0625 ties to 1.0; 6.375 * r = 6.375 > 6 saturates to code 7.
    packed, scales = nvfp4_quantize_reference(block(6.375, 3.0), 1.0)
    assert e4m3_decode(scales).item() == 1.0
    assert codes_of(packed)[:2] == [7, 5]


def test_nvfp4_saturation_above_6_times_448() -> None:
    # bmax = 2 * 6 * 448 with g = 1: sf saturates at 448, values beyond 6 * 448 clamp to code 7.
    packed, scales = nvfp4_quantize_reference(block(5376.0, -5376.0, 2688.0, 448.0), 1.0)
    assert e4m3_decode(scales).item() == 448.0
    assert codes_of(packed)[:4] == [7, 15, 7, 2]
    out = nvfp4_dequantize_reference(packed, scales, 1.0, torch.float32)
    assert out[0, :4].tolist() == [2688.0, -2688.0, 2688.0, 448.0]


def test_nvfp4_subnormal_block_scale() -> None:
    # bmax = 6 * 2^-8: sf = 2^-8, an E4M3 subnormal (byte 0x02); values keep their E2M1 codes.
    x = block(6 * 2.0**-8, 3 * 2.0**-8, -(2.0**-9))
    packed, scales = nvfp4_quantize_reference(x, 1.0)
    assert scales.tolist() == [[0x02]]
    assert codes_of(packed)[:3] == [7, 5, 9]


def test_nvfp4_zero_and_underflowing_blocks_store_zero_codes() -> None:
    x = torch.cat([block(), block(1e-12, -1e-12)])
    packed, scales = nvfp4_quantize_reference(x, 1.0)
    assert scales.tolist() == [[0], [0]]
    # r = 0: every magnitude is 0; the sign of x * r survives, so -1e-12 stores -0 (code 8).
    assert codes_of(packed) == [0] * 16 + [0, 8] + [0] * 14
    assert nvfp4_dequantize_reference(packed, scales, 1.0).eq(0).all()


def test_nvfp4_global_scale_sets_block_scale() -> None:
    # g = amax / 2688 maps the tensor amax to sf = 448 exactly.
    amax = 10.0
    g = amax / 2688.0
    packed, scales = nvfp4_quantize_reference(block(amax, -amax / 2), g)
    assert e4m3_decode(scales).item() == 448.0
    out = nvfp4_dequantize_reference(packed, scales, g, torch.float32)
    assert out[0, 0].item() == pytest.approx(amax, rel=1e-6)


def test_nvfp4_inf_saturates() -> None:
    packed, scales = nvfp4_quantize_reference(block(math.inf, 1.0, -math.inf), 1.0)
    assert e4m3_decode(scales).item() == 448.0
    assert codes_of(packed)[:3] == [7, 0, 15]


def test_nvfp4_check_refuses_nonfinite_and_bad_global() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        nvfp4_quantize_reference(block(math.nan), 1.0, check=True)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and > 0"):
            check_global_scale(bad)


def test_shapes_must_be_2d_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize_reference(torch.zeros(2, 24), 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        blockfp4_quantize_reference(torch.zeros(2, 2, 16))


# --- BlockFP4 golden blocks -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("bmax", "byte"),
    [(6.0, 127), (7.0, 128), (3.0, 126), (12.0, 128), (12.000001, 129), (0.0, 0), (6 * 2.0**-130, 0),
     (6 * 2.0**127, 254), (math.inf, 254)],
)  # fmt: skip
def test_ue8m0_scale_bytes(bmax: float, byte: int) -> None:
    assert ue8m0_encode(torch.tensor([bmax], dtype=torch.float32)).item() == byte


def test_blockfp4_golden_block() -> None:
    # bmax 7 -> scale 2: values are halved before E2M1 rounding.
    x = block(7.0, 0.5, 1.5, 2.5, 3.5, -7.0, 5.0, 0.75)
    packed, scales = blockfp4_quantize_reference(x)
    assert scales.tolist() == [[128]]
    # 7 -> 3.5 -> 4 (tie to even); 0.5 -> 0.25 -> 0 (tie); 1.5 -> 0.75 -> 1; 2.5 -> 1.25 -> 1;
    # 3.5 -> 1.75 -> 2; 5.0 -> 2.5 -> 2; 0.75 -> 0.375 -> 0.5.
    assert codes_of(packed)[:8] == [6, 0, 2, 2, 4, 14, 4, 1]
    out = blockfp4_dequantize_reference(packed, scales, torch.float32)
    assert out[0, :8].tolist() == [8.0, 0.0, 2.0, 2.0, 4.0, -8.0, 4.0, 1.0]


def test_blockfp4_zero_block() -> None:
    packed, scales = blockfp4_quantize_reference(block())
    assert scales.item() == 0 and packed.eq(0).all()
    assert blockfp4_dequantize_reference(packed, scales).eq(0).all()


# --- FP8 per tensor --------------------------------------------------------------------------

def test_fp8_saturates_and_round_trips() -> None:
    x = torch.tensor([[1.0, -2.0, 1000.0, 0.0]])
    data = fp8_quantize_reference(x, 0.5)
    assert data.dtype == torch.float8_e4m3fn
    assert fp8_dequantize_reference(data, 0.5, torch.float32).tolist() == [[1.0, -2.0, 224.0, 0.0]]


# --- properties over shapes and magnitudes ------------------------------------------------------

shapes = st.tuples(st.integers(1, 6), st.sampled_from([16, 32, 64, 128]))
log_scales = st.floats(min_value=-20, max_value=20)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, log_scale=log_scales, seed=st.integers(0, 2**31 - 1))
def test_nvfp4_round_trip_error_bound(shape: tuple[int, int], log_scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2.0**log_scale
    g = x.abs().max().clamp_min(1e-30) / 2688.0
    packed, scales = nvfp4_quantize_reference(x, g)
    assert packed.shape == (shape[0], shape[1] // 2) and scales.shape == (shape[0], shape[1] // 16)
    out = nvfp4_dequantize_reference(packed, scales, g, torch.float32)
    step = (e4m3_decode(scales) * g).repeat_interleave(16, dim=1)
    # Largest E2M1 gap is 2 (4 -> 6): error <= 1 step, plus saturation from scale rounding (<= 6/16).
    assert ((out - x).abs() <= step * 1.0 + 1e-30).all()
    assert (torch.sign(out) * torch.sign(x) >= 0).all()


@settings(max_examples=40, deadline=None)
@given(shape=shapes, shift=st.integers(-20, 20), seed=st.integers(0, 2**31 - 1))
def test_nvfp4_bytes_invariant_under_power_of_two_scaling(shape: tuple[int, int], shift: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    g = x.abs().max() / 2688.0
    a = nvfp4_quantize_reference(x, g)
    b = nvfp4_quantize_reference(x * 2.0**shift, g * 2.0**shift)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@settings(max_examples=40, deadline=None)
@given(shape=shapes, shift=st.integers(-30, 30), seed=st.integers(0, 2**31 - 1))
def test_blockfp4_power_of_two_scaling_shifts_scale_byte(shape: tuple[int, int], shift: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) + 0.01
    p1, s1 = blockfp4_quantize_reference(x)
    p2, s2 = blockfp4_quantize_reference(x * 2.0**shift)
    assert torch.equal(p1, p2)
    assert torch.equal(s2.int(), s1.int() + shift)
    out = blockfp4_dequantize_reference(p1, s1, torch.float32)
    step = torch.ldexp(torch.ones_like(s1, dtype=torch.float32), s1.int() - 127).repeat_interleave(16, dim=1)
    assert ((out - x).abs() <= step).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_fp32_of_same_values(dtype: torch.dtype) -> None:
    x = (torch.randn(8, 64) * 3).to(dtype)
    g = 3.0 / 2688
    assert all(torch.equal(a, b) for a, b in zip(nvfp4_quantize_reference(x, g), nvfp4_quantize_reference(x.float(), g)))
    out = nvfp4_dequantize_reference(*nvfp4_quantize_reference(x, g), g, dtype)
    assert out.dtype == dtype and out.shape == x.shape


def test_4over6_reads_as_nvfp4_and_lowers_the_error() -> None:
    """nvfp4_4over6's bytes decode with the unchanged NVFP4 reader; the max->4 candidate is taken
    on some blocks, not all, and the total reconstruction error drops."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 256, generator=gen) * torch.logspace(-2, 1, 256)  # spread block ranges
    g = float(x.abs().max()) / (6 * 448)
    shipped_bytes = nvfp4_quantize_reference(x, g)
    chosen_bytes = nvfp4_4over6_quantize_reference(x, g)
    shipped = nvfp4_dequantize_reference(*shipped_bytes, g, torch.float32)
    chosen = nvfp4_dequantize_reference(*chosen_bytes, g, torch.float32)

    def block_err(y: torch.Tensor) -> torch.Tensor:
        return ((y - x) ** 2).reshape(64, -1, 16).sum(-1)

    taken = chosen_bytes[1] != shipped_bytes[1]
    assert 0.05 < taken.float().mean() < 0.95
    assert float(block_err(chosen).sum()) < 0.95 * float(block_err(shipped).sum())
    kept = ~taken  # blocks that kept the 6 scale also kept nvfp4's codes
    chosen_codes = unpack_nibbles(chosen_bytes[0]).reshape(64, -1, 16)
    shipped_codes = unpack_nibbles(shipped_bytes[0]).reshape(64, -1, 16)
    assert torch.equal(chosen_codes[kept], shipped_codes[kept])


def _one_block(values: list[float], g: float = 1.0) -> tuple[int, int, int]:
    """(4over6 scale byte, nvfp4 scale byte, the max->4 candidate's scale byte) of one 16-block."""
    x = torch.tensor([values + [0.0] * (16 - len(values))], dtype=torch.float32)
    four = e4m3_encode_satfinite(torch.tensor(max(abs(v) for v in values) / g * 0.25))
    return (
        int(nvfp4_4over6_quantize_reference(x, g)[1]),
        int(nvfp4_quantize_reference(x, g)[1]),
        int(four),
    )


@pytest.mark.parametrize(
    ("values", "expect"),
    [
        ([6.0] + [5.0] * 15, "4"),  # 5 is an E2M1 tie at scale 1 (-> 4, error 1); 5/1.5 -> 3 (error 0.5)
        ([6.0, 3.0, 1.5, 0.5, -3.0], "6"),  # exact on the max->6 grid; 0.5/1.5 rounds
        ([6.0, -3.0, 1.5], "tie"),  # exact on both grids: equal errors keep 6
        ([6.0, 3.0, 1.5, 0.75], "4"),  # 0.75 ties up to 1 at scale 1, exact as 0.5 x 1.5
        ([2.5 * 2.0**-9, 2.0**-10], "4"),  # max/6 underflows the E4M3 scale to 0, max/4 does not
        ([6.0 * 448, 17.0], "same"),  # max/4 saturates at 448: both candidates are the 6 one
    ],
)
def test_4over6_choice_on_constructed_blocks(values: list[float], expect: str) -> None:
    """The 4-vs-6 choice on blocks built so each candidate's error is known: rounding ties of
    either grid, an exact tie (kept 6, though the 4 candidate's scale byte differs), an E4M3
    underflow of the 6 candidate and a saturated 4 candidate."""
    chosen, six, four = _one_block(values)
    if expect == "4":
        assert chosen == four != six
    elif expect == "same":
        assert chosen == six == four
    else:
        assert chosen == six and (expect == "6" or four != six)


def test_scaled_scales_multiplies_every_amax(tmp_path) -> None:
    """scripts/block_scale_rule.py --amax-factors: the scaled copy's NVFP4 global scales are the
    original ones times the factor (per layer, K and V), everything else unchanged."""
    from conftest import load_script

    rule = load_script("block_scale_rule")
    layers = [
        {"index": i, "k_amax": 3.0 + i, "v_amax": 1.5 * (i + 1), "k_amax_per_head": [3.0, 2.0],
         "v_amax_per_head": None}
        for i in range(2)
    ]
    source = tmp_path / "s.json"
    source.write_text(json.dumps({"schema": "fp4kv.scales", "version": 1, "layers": layers}))
    scaled = json.loads(Path(rule.scaled_scales(str(source), 0.5, tmp_path)).read_text())
    method = NVFP4KVMethod()
    before, after = method.load_scales(str(source)), method.load_scales(scaled)
    assert torch.equal(after.k, before.k * 0.5) and torch.equal(after.v, before.v * 0.5)
    assert scaled["layers"][1]["k_amax_per_head"] == [1.5, 1.0] and scaled["layers"][1]["index"] == 1
