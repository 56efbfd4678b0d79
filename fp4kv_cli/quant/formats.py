"""Element and scale encodings shared by every KV format: E2M1, E4M3 and UE8M0.

These are the bit-level building blocks of the PyTorch reference. Every function is exact
IEEE fp32 arithmetic (no approximate reciprocals), so the same inputs give the same bytes on
CPU and GPU; GPU kernels must reproduce them bit for bit.
"""

from __future__ import annotations

import functools

import torch

#: Largest finite E4M3 (``float8_e4m3fn``) value.
E4M3_MAX = 448.0
#: Largest E2M1 magnitude.
E2M1_MAX = 6.0
#: Elements that share one block scale in both FP4 KV formats.
FP4_BLOCK_SIZE = 16
#: UE8M0 exponent bias; byte ``e`` encodes ``2 ** (e - 127)``.
UE8M0_BIAS = 127

#: Magnitudes of the eight E2M1 codes, then the same negated (code | 8 sets the sign).
E2M1_VALUES: tuple[float, ...] = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

#: Rounding thresholds between neighbouring E2M1 magnitudes; ``>`` where the tie goes to the
#: lower (even) code, ``>=`` where it goes to the upper (even) code.
E2M1_THRESHOLDS_UP_IS_EVEN: tuple[tuple[float, bool], ...] = (
    (0.25, False),  # 0 | 0.5   tie -> 0   (code 0 even)
    (0.75, True),  # 0.5 | 1   tie -> 1   (code 2 even)
    (1.25, False),  # 1 | 1.5   tie -> 1
    (1.75, True),  # 1.5 | 2   tie -> 2   (code 4 even)
    (2.5, False),  # 2 | 3     tie -> 2
    (3.5, True),  # 3 | 4     tie -> 4   (code 6 even)
    (5.0, False),  # 4 | 6     tie -> 4
)


@functools.cache
def e2m1_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 E2M1 code values as a float32 tensor of shape ``[16]`` (one copy per device)."""
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to E2M1 codes, nearest with ties to the even code, saturating at 6.

    Parameters
    ----------
    y:
        float32 tensor of any shape, already divided by its block scale.

    Returns
    -------
    torch.Tensor
        uint8 codes of the same shape in ``[0, 15]``; bit 3 is the sign bit of ``y`` (so
        small negatives become -0, code 8). NaN maps to magnitude 0 with NaN's sign bit.
    """
    a = y.abs()
    code = torch.zeros_like(y, dtype=torch.uint8)
    for threshold, up_is_even in E2M1_THRESHOLDS_UP_IS_EVEN:
        code += (a >= threshold) if up_is_even else (a > threshold)
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, any shape, values 0..15) to their float32 values."""
    return e2m1_table(codes.device)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes ``[..., K]`` into bytes ``[..., K/2]``; the even element is the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes ``[..., K/2]`` to codes ``[..., K]``."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def e4m3_encode_satfinite(v: torch.Tensor) -> torch.Tensor:
    """fp32 to E4M3 bytes (``float8_e4m3fn``), round to nearest even, saturating at +-448.

    Subnormal E4M3 values are produced as IEEE rounding gives them. NaN stays NaN (0x7F/0xFF).
    Returns uint8 of the same shape.
    """
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_decode(byte: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes (uint8) to float32 values."""
    return byte.view(torch.float8_e4m3fn).to(torch.float32)


def ue8m0_exponent(v: torch.Tensor) -> torch.Tensor:
    """``ceil(log2(v))`` for positive fp32 ``v``, exactly (via frexp), as int32.

    ``v`` equal to a power of two gives its exponent; zero gives ``-127`` (callers mask it).
    """
    mantissa, exponent = torch.frexp(v)
    exact_power = mantissa == 0.5
    return torch.where(exact_power, exponent - 1, exponent).to(torch.int32)


def ue8m0_encode(block_max: torch.Tensor) -> torch.Tensor:
    """BlockFP4 scale byte per block: ``clamp(ceil(log2(bmax / 6)), -127, 127) + 127``.

    ``bmax`` is the float32 block absolute maximum; an all-zero block gets byte 0. ``inf``
    saturates to byte 254. Returns uint8 of the same shape.
    """
    # Tensor / tensor: CUDA turns division by a Python scalar into a multiply by its reciprocal.
    ratio = block_max / torch.full_like(block_max, E2M1_MAX)
    exponent = ue8m0_exponent(ratio).clamp(-UE8M0_BIAS, UE8M0_BIAS)
    exponent = torch.where(torch.isinf(ratio), UE8M0_BIAS, exponent)
    byte = (exponent + UE8M0_BIAS).to(torch.uint8)
    return torch.where(block_max == 0, torch.zeros_like(byte), byte)


def ue8m0_decode(byte: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes to their float32 power of two ``2 ** (byte - 127)``."""
    one = torch.ones(byte.shape, dtype=torch.float32, device=byte.device)
    return torch.ldexp(one, byte.to(torch.int32) - UE8M0_BIAS)
