"""PyTorch reference quantizers: the one truth of every KV format's bytes.

NVFP4 follows the arithmetic of FlashInfer's ``nvfp4_kv_quantize`` kernel with correctly
rounded fp32 reciprocals. Per 16-element block along the last dimension, in fp32:

- ``bmax = max |x|``
- ``sf = e4m3_rn_satfinite((1 / g) * (bmax * (1 / 6)))``  (the stored scale byte)
- ``r = 1 / (float(sf) * g)`` if ``sf != 0`` else ``0``
- ``code = e2m1_rn_satfinite(x * r)``; ``dequant = (E2M1[code] * float(sf)) * g``

A block whose scale underflows to zero (``sf == 0``; this includes ``bmax == 0``) stores
zero codes, as FlashInfer does; its values dequantize to 0 either way.

NVFP4 "4 over 6" (``nvfp4_4over6``, vLLM's KV cache dtype of that name, its store kernel
``cvt_warp_fp16_to_fp4_4over6``): the same layout and reader; per block the writer forms two
candidates, the max mapped to 6 (``sf6``/``r6`` as above) and to 4 (``bmax * 0.25`` instead of
``bmax * (1/6)``), scores each by its squared reconstruction error in the writer's own terms,
``d_i = E2M1[code_i] * (1 / r) - x_i`` (0 for ``1 / r`` where ``r == 0``), summed as
``err = (((d_0^2 + d_1^2) + (d_2^2 + d_3^2)) + ...)`` pair by pair in element order (vLLM's
16-element thread loop), and keeps the 4 candidate only when ``err4 < err6`` (a tie keeps 6).
Every step is one correctly rounded fp32 operation; vLLM's CUDA uses ``rcp.approx.ftz`` for the
reciprocals, which this core replaces by correctly rounded ones throughout (as for ``nvfp4``).

BlockFP4 (single level, UE8M0 power-of-two scale per 16):
``e = clamp(ceil(log2(bmax / 6)), -127, 127) + 127`` (0 for a zero block),
``code = e2m1_rn_satfinite(x * 2 ** -(e - 127))``, ``dequant = E2M1[code] * 2 ** (e - 127)``.

FP8 (per tensor): ``byte = e4m3_rn_satfinite(x / s)``, ``dequant = float(byte) * s``.

NaN/Inf policy: the reference raises ``ValueError`` on non-finite input when called with
``check_finite=True`` (the cache and calibration paths do). Without the check, ``+-inf``
saturates to the largest code and block scale; NaN output bytes are unspecified and
backends need not agree on them. Global scales must be finite and > 0 (``g = 0`` is refused:
it would make ``1 / g`` infinite and every scale byte saturate).
"""

from __future__ import annotations

import torch

from fp4kv_cli.quant.formats import (
    E4M3_MAX,
    FP4_BLOCK_SIZE,
    e2m1_decode,
    e2m1_encode,
    e4m3_decode,
    e4m3_encode_satfinite,
    pack_nibbles,
    ue8m0_decode,
    ue8m0_encode,
    unpack_nibbles,
)

_ONE_SIXTH = 1.0 / 6.0
_ONE_FOURTH = 0.25


def as_global_scale(global_scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A per-tensor scale as a 0-dim float32 tensor on ``device`` (no host sync for tensors)."""
    if isinstance(global_scale, torch.Tensor):
        return global_scale.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(global_scale), dtype=torch.float32, device=device)


def check_global_scale(global_scale: float | torch.Tensor, name: str = "global_scale") -> None:
    """Raise ``ValueError`` unless every element of ``global_scale`` is finite and > 0."""
    value = torch.as_tensor(global_scale, dtype=torch.float32)
    if not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
        raise ValueError(
            f"{name} must be finite and > 0, got {value.tolist()}; "
            "calibrate the model (fp4kv calibrate) or use dynamic scales"
        )


def check_finite(x: torch.Tensor, what: str = "input") -> None:
    """Raise ``ValueError`` naming ``what`` if ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} holds NaN or Inf; FP4 KV quantization needs finite values")


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.shape[-1] % FP4_BLOCK_SIZE:
        raise ValueError(
            f"expected a 2-D tensor [M, K] with K a multiple of {FP4_BLOCK_SIZE}, "
            f"got shape {tuple(x.shape)}"
        )
    return x.to(torch.float32).reshape(x.shape[0], -1, FP4_BLOCK_SIZE)


def nvfp4_quantize_reference(
    x: torch.Tensor, global_scale: float | torch.Tensor, check: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to NVFP4 with the global dequant scale ``g``.

    Parameters
    ----------
    x:
        ``[M, K]`` bf16/fp16/fp32, K a multiple of 16.
    global_scale:
        FP32 per-tensor dequant scale ``g`` (typically ``amax / (6 * 448)``).
    check:
        Raise on non-finite ``x`` or a non-positive ``g``.

    Returns
    -------
    packed: ``[M, K/2]`` uint8, two E2M1 codes a byte, low nibble = even element.
    scales: ``[M, K/16]`` uint8 E4M3 block-scale bytes.
    """
    if check:
        check_finite(x)
        check_global_scale(global_scale)
    sf_byte, _, codes = _nvfp4_encode(_blocks(x), as_global_scale(global_scale, x.device), _ONE_SIXTH)
    return pack_nibbles(codes.reshape(x.shape[0], -1)), sf_byte


def nvfp4_4over6_quantize_reference(
    x: torch.Tensor, global_scale: float | torch.Tensor, check: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [M, K]`` to NVFP4 with each block's scale chosen "4 over 6" (module docstring):
    the same outputs, layout and reader as :func:`nvfp4_quantize_reference`."""
    if check:
        check_finite(x)
        check_global_scale(global_scale)
    xb = _blocks(x)
    g = as_global_scale(global_scale, x.device)
    sf6, r6, codes6 = _nvfp4_encode(xb, g, _ONE_SIXTH)
    sf4, r4, codes4 = _nvfp4_encode(xb, g, _ONE_FOURTH)
    use4 = _writer_error(xb, r4, codes4) < _writer_error(xb, r6, codes6)
    codes = torch.where(use4.unsqueeze(-1), codes4, codes6)
    return pack_nibbles(codes.reshape(x.shape[0], -1)), torch.where(use4, sf4, sf6)


def _nvfp4_encode(
    xb: torch.Tensor, g: torch.Tensor, reciprocal_top: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E4M3 scale bytes ``[M, B]``, reciprocals ``r [M, B]`` and E2M1 codes ``[M, B, 16]`` of fp32
    blocks ``xb [M, B, 16]`` with global scale ``g``, each block's max mapped to the E2M1 value
    ``1 / reciprocal_top`` (``_ONE_SIXTH``: 6, the nvfp4 rule; ``_ONE_FOURTH``: 4)."""
    block_max = xb.abs().amax(dim=-1)
    sf_byte = e4m3_encode_satfinite((1.0 / g) * (block_max * reciprocal_top))
    sf = e4m3_decode(sf_byte)
    denom = sf * g
    reciprocal = torch.where(sf != 0, 1.0 / denom, torch.zeros_like(denom))
    return sf_byte, reciprocal, e2m1_encode(xb * reciprocal.unsqueeze(-1))


def _writer_error(xb: torch.Tensor, reciprocal: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The 4-over-6 writer's squared error ``[M, B]`` of one candidate: ``d = E2M1[code] * (1 / r)
    - x`` per element, ``d_even^2 + d_odd^2`` per pair, the pairs added left to right."""
    dequant = torch.where(reciprocal != 0, 1.0 / reciprocal, torch.zeros_like(reciprocal))
    diff = e2m1_decode(codes) * dequant.unsqueeze(-1) - xb
    pairs = diff[..., 0::2] * diff[..., 0::2] + diff[..., 1::2] * diff[..., 1::2]
    error = pairs[..., 0]
    for i in range(1, pairs.shape[-1]):
        error = error + pairs[..., i]
    return error


def nvfp4_dequantize_reference(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: float | torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Decode NVFP4 ``packed [M, K/2]`` + ``scales [M, K/16]`` to ``[M, K]`` of ``dtype``.

    Values are ``(E2M1[code] * float(sf)) * g`` in fp32, then rounded to ``dtype``.
    """
    g = as_global_scale(global_scale, packed.device)
    values = _decode_blocks(packed, e4m3_decode(scales))
    return (values * g).reshape(packed.shape[0], -1).to(dtype)


def blockfp4_quantize_reference(
    x: torch.Tensor, check: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [M, K]`` to BlockFP4: packed ``[M, K/2]`` uint8, UE8M0 scales ``[M, K/16]`` uint8."""
    if check:
        check_finite(x)
    xb = _blocks(x)
    scale_byte = ue8m0_encode(xb.abs().amax(dim=-1))
    inverse = ue8m0_decode((2 * 127 - scale_byte.to(torch.int32)).clamp(0, 254).to(torch.uint8))
    codes = e2m1_encode(xb * inverse.unsqueeze(-1))
    return pack_nibbles(codes.reshape(x.shape[0], -1)), scale_byte


def blockfp4_dequantize_reference(
    packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Decode BlockFP4 ``packed [M, K/2]`` + ``scales [M, K/16]`` to ``[M, K]`` of ``dtype``."""
    values = _decode_blocks(packed, ue8m0_decode(scales))
    return values.reshape(packed.shape[0], -1).to(dtype)


def fp4_quantize_readback(
    fmt: str, x: torch.Tensor, global_scale: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x [M, K]`` in ``fmt`` (``nvfp4``, ``nvfp4_4over6`` or ``blockfp4``) and return
    ``(packed, scales, values)``: the bytes of the format's quantizer and ``values [M, K]`` of
    ``dtype``, bit for bit what its dequantize of those bytes gives (same fp32 operations on the
    same codes and block scales), without unpacking them again: what a cache write that also
    fills a read buffer needs. ``global_scale`` (NVFP4) is one scale, or ``[M, 1]`` float32, one
    per row (each row then gets exactly the bytes and values its own scale gives: K and V rows,
    each with its tensor's scale, quantized in one pass)."""
    xb = _blocks(x)
    if fmt == "blockfp4":
        scale_byte = ue8m0_encode(xb.abs().amax(dim=-1))
        inverse = ue8m0_decode((2 * 127 - scale_byte.to(torch.int32)).clamp(0, 254).to(torch.uint8))
        codes = e2m1_encode(xb * inverse.unsqueeze(-1))
        values = e2m1_decode(codes) * ue8m0_decode(scale_byte).unsqueeze(-1)
    else:
        per_row = isinstance(global_scale, torch.Tensor) and global_scale.dim() == 2
        g = global_scale.to(torch.float32) if per_row else as_global_scale(global_scale, x.device)
        scale_byte, reciprocal, codes = _nvfp4_encode(xb, g, _ONE_SIXTH)
        if fmt == "nvfp4_4over6":
            sf4, r4, codes4 = _nvfp4_encode(xb, g, _ONE_FOURTH)
            use4 = _writer_error(xb, r4, codes4) < _writer_error(xb, reciprocal, codes)
            codes = torch.where(use4.unsqueeze(-1), codes4, codes)
            scale_byte = torch.where(use4, sf4, scale_byte)
        row_g = g.unsqueeze(-1) if per_row else g
        values = (e2m1_decode(codes) * e4m3_decode(scale_byte).unsqueeze(-1)) * row_g
    packed = pack_nibbles(codes.reshape(x.shape[0], -1))
    return packed, scale_byte, values.reshape(x.shape[0], -1).to(dtype)


def fp8_quantize_reference(
    x: torch.Tensor, scale: float | torch.Tensor, check: bool = False
) -> torch.Tensor:
    """Per-tensor FP8: ``e4m3_rn_satfinite(x / s)`` as ``float8_e4m3fn`` of ``x``'s shape."""
    if check:
        check_finite(x)
        check_global_scale(scale, "fp8 scale")
    s = as_global_scale(scale, x.device)
    return e4m3_encode_satfinite(x.to(torch.float32) / s).view(torch.float8_e4m3fn)


def fp8_dequantize_reference(
    data: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Per-tensor FP8 decode: ``float(data) * s`` rounded to ``dtype``."""
    s = as_global_scale(scale, data.device)
    return (data.to(torch.float32) * s).to(dtype)


def to_fp8_output(values: torch.Tensor, fp8_scale: float | torch.Tensor) -> torch.Tensor:
    """Re-encode dequantized fp32 ``values`` as E4M3 with per-tensor scale ``fp8_scale``."""
    s = as_global_scale(fp8_scale, values.device)
    return e4m3_encode_satfinite(values / s).view(torch.float8_e4m3fn)


def _decode_blocks(packed: torch.Tensor, block_scale: torch.Tensor) -> torch.Tensor:
    if packed.dim() != 2 or block_scale.dim() != 2 or packed.shape[1] != block_scale.shape[1] * 8:
        raise ValueError(
            f"packed [M, K/2] and scales [M, K/16] disagree: {tuple(packed.shape)} vs "
            f"{tuple(block_scale.shape)}"
        )
    codes = unpack_nibbles(packed).reshape(packed.shape[0], -1, FP4_BLOCK_SIZE)
    return e2m1_decode(codes) * block_scale.unsqueeze(-1)


__all__ = [
    "E4M3_MAX",
    "as_global_scale",
    "blockfp4_dequantize_reference",
    "blockfp4_quantize_reference",
    "check_finite",
    "check_global_scale",
    "fp4_quantize_readback",
    "fp8_dequantize_reference",
    "fp8_quantize_reference",
    "nvfp4_4over6_quantize_reference",
    "nvfp4_dequantize_reference",
    "nvfp4_quantize_reference",
    "to_fp8_output",
]
