"""Triton kernels for NVFP4 (and its 4-over-6 writer) and BlockFP4 (SM80+), bit-exact with
:mod:`fp4kv_cli.quant.reference`.

Every 16-element block is handled as 8 *pairs*: the input is read as 32-bit words (two bf16/fp16
elements) or 64-bit words (two fp32), the even element in the low half, so one pair becomes one
packed byte (low nibble = even element) with no shuffles. Quantize loads a block's 8 words as two
halves of 4, so one thread holds the whole block; dequantize writes pairs the same way. The
arithmetic mirrors the reference step for step:

- divisions and reciprocals are correctly rounded (``tl.math.div_rn``); the kernels run with
  ``enable_fp_fusion=False``, so the one add that follows a rounded product (E2M1 rounding below
  1) is never fused into it;
- E4M3 encode/decode, the UE8M0 ``ceil(log2)`` (frexp semantics, including the reference's
  ``ratio == 0 -> exponent 0`` quirk) and the E2M1 rounding (ties to the even code) are integer
  bit manipulation on fp32 encodings, so no conversion instruction (absent on SM80 for E4M3)
  and no flush-to-zero can change a byte;
- the E2M1 code is computed from ``|x| * r`` (``r >= 0``) and takes ``x``'s sign bit, which is the
  reference's ``signbit(x * r)`` wherever ``x * r`` is not NaN (NaN bytes are unspecified).

NVFP4 "4 over 6" (``nvfp4_4over6``, ``FMT`` 2) quantizes each block twice in registers (max
mapped to 6 and to 4), scores both with the reference's writer error (pair errors added in
element order, each product and sum rounded: fusion is off) and keeps the 4 candidate only when
its error is strictly smaller; its bytes decode as NVFP4 (the dequantize kernel takes the
reader layout, :func:`~fp4kv_cli.quant.backend.read_layout`, not the writer).

The global scale ``g`` is a 0-dim float32 device tensor read inside the kernel (no host sync).
Under ``TRITON_INTERPRET=1`` (CPU tests) fp32 -> bf16 is rounded in integer code, because the
interpreter truncates that conversion; on the GPU the hardware ``cvt.rn`` is used.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from fp4kv_cli.quant.backend import NVFP4_WRITERS, TorchBackend, read_layout
from fp4kv_cli.quant.formats import FP4_BLOCK_SIZE
from fp4kv_cli.quant.reference import as_global_scale

#: Writer ids passed to the quantize kernel as ``FMT``.
_FORMAT_IDS = {"nvfp4": 0, "blockfp4": 1, "nvfp4_4over6": 2}
#: Element dtypes the kernels read or write, as ``IN_KIND`` / ``OUT_KIND`` ids.
_DTYPE_IDS = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
#: Elements one program handles (rows x blocks x 16) and its warps, per kernel: the best of the
#: H100 sweep of ``scripts/tune_fp4_kernels.py`` at 64M elements (docs/benchmarks.md).
QUANTIZE_TILE_ELEMENTS = 1024
QUANTIZE_WARPS = 1
#: Quantize launch variants, all writing the same bytes (``_quantize_kernel``'s WIDE_STORE,
#: WHOLE_LOAD, cache hint, PERSISTENT and STAGES flags), swept by ``scripts/tune_fp4_kernels.py``:
#: one int64 store of a block's 8 codes (where the buffer's rows allow an int64 view), one load of a
#: block's 32 bytes, PTX cache hints ("": none), and a persistent grid of QUANTIZE_PROGRAMS_PER_SM
#: programs per SM (0: one program per tile) whose loop is pipelined over QUANTIZE_STAGES stages.
QUANTIZE_WIDE_STORE = True
QUANTIZE_WHOLE_LOAD = True
QUANTIZE_LOAD_CACHE = ""
QUANTIZE_LOAD_EVICT = ""
QUANTIZE_STORE_CACHE = ""
QUANTIZE_PROGRAMS_PER_SM = 32
QUANTIZE_STAGES = 3
DEQUANTIZE_TILE_ELEMENTS = 4096
DEQUANTIZE_WARPS = 4
#: Widest row chunk, in 16-element blocks, one program covers.
MAX_TILE_BLOCKS = 64


@triton.jit
def _e4m3_encode(v):
    """E4M3 byte (int32) of non-negative fp32 ``v`` <= 448 (or NaN), nearest even."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal E4M3 (v >= 2^-6): round the fp32 mantissa to 3 bits, rebias 127 -> 7.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # Subnormal E4M3 (steps of 2^-9): v * 512 is exact; adding 2^23 rounds it to an integer.
    subnormal = (v * 512.0 + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000
    byte = tl.where(bits >= (121 << 23), normal, subnormal)
    return tl.where(v != v, 0x7F, byte)  # noqa: PLR0124 (NaN test)


@triton.jit
def _e4m3_decode(byte):
    """fp32 value of E4M3 bytes (int32 0..255)."""
    mag = byte & 0x7F
    subnormal = ((mag & 7).to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)
    bits = tl.where(mag < 8, subnormal, (mag + (120 << 3)) << 20)
    bits = tl.where(mag == 0x7F, 0x7FC00000, bits)
    # The sign is OR-ed in: Triton's unary minus is 0 - x, which turns -0 into +0.
    return (bits | ((byte & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_magnitude(a):
    """E2M1 magnitude code (int32 0..7) of fp32 ``a >= 0``: nearest, ties to the even code, saturating."""
    bits = a.to(tl.int32, bitcast=True)
    # a >= 1: E2M1 is a 1-mantissa-bit float there; round the fp32 mantissa to 1 bit and rebias
    # (codes 2..7 are the encodings of 1, 1.5, 2, 3, 4, 6); the clamp saturates at code 7.
    normal = tl.minimum((bits + (0x1FFFFF - (252 << 22)) + ((bits >> 22) & 1)) >> 22, 7)
    # a < 1: codes 0, 1, 2 are 0, 0.5, 1: adding 2^22 (ulp 0.5) rounds a to that grid, ties to even.
    # ``a`` is a rounded product; the kernels run with fp fusion off, so this add is not fused into it.
    small = (a + 4194304.0).to(tl.int32, bitcast=True) - 0x4A800000
    return tl.where(a < 1.0, small, normal)


@triton.jit
def _encode_pairs(even, odd, r):
    """Packed bytes (int32) of fp32 element pairs times ``r >= 0``: E2M1 code of the even element in
    the low nibble, of the odd one in the high nibble, each with its element's sign bit."""
    lo = _e2m1_magnitude(tl.abs(even) * r) | ((even.to(tl.int32, bitcast=True) >> 28) & 8)
    hi = _e2m1_magnitude(tl.abs(odd) * r) | ((odd.to(tl.int32, bitcast=True) >> 28) & 8)
    return lo | (hi << 4)


@triton.jit
def _unpack_pairs(w, IN_KIND: tl.constexpr):
    """Even and odd elements (fp32) of pair words: bf16 (IN_KIND 0) / fp16 (1) in int32, fp32 (2) in int64."""
    if IN_KIND == 0:
        even = (w << 16).to(tl.float32, bitcast=True)
        odd = (w & -65536).to(tl.float32, bitcast=True)
    elif IN_KIND == 1:
        even = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        even = w.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (w >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _e2m1_value(code):
    """fp32 value of E2M1 codes (int32 0..15)."""
    m = code & 7
    bits = tl.where(m >= 2, (m + 252) << 22, m * 0x3F000000)
    return (bits | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _decode_pairs(packed, scale_byte, g_ptr, NVFP4: tl.constexpr):
    """fp32 values of the even (low nibble) and odd elements of packed bytes ``[rows, blocks, pairs]``
    (int32) with their blocks' scale bytes ``[rows, blocks]`` (int32): ``E2M1 * E4M3 scale * g``
    (NVFP4, ``g`` read from ``g_ptr``) or ``E2M1 * UE8M0 scale`` (BlockFP4), the reference's products."""
    if NVFP4:
        scale = _e4m3_decode(scale_byte)
    else:
        scale = tl.where(scale_byte == 0, 0x00400000, scale_byte << 23).to(tl.float32, bitcast=True)
    s3 = scale[:, :, None]
    lo = _e2m1_value(packed & 15) * s3
    hi = _e2m1_value(packed >> 4) * s3
    if NVFP4:
        g = tl.load(g_ptr)
        lo = lo * g
        hi = hi * g
    return lo, hi


@triton.jit
def _nvfp4_scale(block_max, g, reciprocal_top):
    """NVFP4 scale byte (int32) and reciprocal ``r`` of blocks of ``block_max`` whose max maps to the
    E2M1 value ``1 / reciprocal_top``: ``sf = e4m3((1/g) * (bmax * top))``, ``r = 1 / (float(sf) * g)``
    (0 where ``sf == 0``)."""
    u = tl.math.div_rn(1.0, g) * (block_max * reciprocal_top)
    u = tl.where(u > 448.0, 448.0, u)
    scale_byte = _e4m3_encode(u)
    denom = _e4m3_decode(scale_byte) * g
    r = tl.where(scale_byte != 0, tl.math.div_rn(tl.full(denom.shape, 1.0, tl.float32), denom), 0.0)
    return scale_byte, r


@triton.jit
def _pair_error(even, odd, r3, d3):
    """``d_even^2 + d_odd^2`` per pair, ``d = E2M1[code(x * r)] * d3 - x`` (``[rows, blocks, 4]``)."""
    packed = _encode_pairs(even, odd, r3)
    de = _e2m1_value(packed & 15) * d3 - even
    do = _e2m1_value(packed >> 4) * d3 - odd
    return de * de + do * do


@triton.jit
def _lanes(p):
    """The four lanes of ``p [rows, blocks, 4]`` as ``[rows, blocks]`` tensors, in lane order."""
    a, b = tl.split(tl.reshape(p, [p.shape[0], p.shape[1], 2, 2]))  # lanes (0, 2) and (1, 3)
    l0, l2 = tl.split(a)
    l1, l3 = tl.split(b)
    return l0, l1, l2, l3


@triton.jit
def _writer_error(x0, x1, x2, x3, r):
    """The 4-over-6 writer's squared error per block (``[rows, blocks]``) of the candidate with
    reciprocal ``r``: pair errors added left to right over pairs 0..7, as the reference does."""
    d = tl.where(r != 0, tl.math.div_rn(tl.full(r.shape, 1.0, tl.float32), r), 0.0)
    r3 = r[:, :, None]
    d3 = d[:, :, None]
    p0, p1, p2, p3 = _lanes(_pair_error(x0, x1, r3, d3))
    p4, p5, p6, p7 = _lanes(_pair_error(x2, x3, r3, d3))
    return ((((((p0 + p1) + p2) + p3) + p4) + p5) + p6) + p7


@triton.jit
def _half_bits(v, OUT_KIND: tl.constexpr, SOFT_BF16: tl.constexpr):
    """16-bit encoding (int32 0..0xFFFF) of fp32 ``v`` as bf16 (OUT_KIND 0) or fp16 (1), nearest even."""
    if OUT_KIND == 1:
        out = v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    elif SOFT_BF16:
        bits = v.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
        out = tl.where(v != v, ((bits >> 16) | 0x40) & 0xFFFF, rounded)  # noqa: PLR0124 (NaN test)
    else:
        out = v.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.int32)
    return out


@triton.jit
def _tile(tile, n_rows, heads, n_blocks, ROWS: tl.constexpr, BLOCKS: tl.constexpr, LANES: tl.constexpr):
    """Rows of row tile ``tile``, their (token, head), this program's block columns, the validity
    masks and the offsets ``[1, BLOCKS, LANES]`` of the first LANES pair words of each block in a row."""
    rows = tile * ROWS + tl.arange(0, ROWS)
    blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    row_ok = rows < n_rows
    token = rows // heads
    head = rows - token * heads
    block_ok = row_ok[:, None] & (blocks < n_blocks)[None, :]
    pair = blocks[None, :, None] * 8 + tl.arange(0, LANES)[None, None, :]
    return row_ok, token, head, blocks, block_ok, pair


@triton.jit
def _quantize_kernel(
    x_ptr,
    data_ptr,
    scale_ptr,
    g_ptr,
    loc_ptr,
    n_rows,
    heads,
    n_blocks,
    x_stride_tok,
    x_stride_head,
    data_stride_tok,
    data_stride_head,
    scale_stride_tok,
    scale_stride_head,
    FMT: tl.constexpr,
    IN_KIND: tl.constexpr,
    SCATTER: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCKS: tl.constexpr,
    WHOLE_LOAD: tl.constexpr = False,
    WIDE_STORE: tl.constexpr = False,
    LOAD_CACHE: tl.constexpr = "",
    LOAD_EVICT: tl.constexpr = "",
    STORE_CACHE: tl.constexpr = "",
    PERSISTENT: tl.constexpr = False,
    STAGES: tl.constexpr = 1,
):
    """Rows ``(token, head)`` of x (pair words) -> packed bytes and scale bytes, at slot ``loc[token]``
    when SCATTER else at ``token``.

    One thread holds a whole block (its 8 pair words as two halves of 4): the block maximum needs
    no shuffle and the per-block scale math runs once per block. By default each thread loads its
    block's two halves itself.

    Launch variants, all writing the same bytes (swept by ``scripts/tune_fp4_kernels.py``):

    - WHOLE_LOAD: load a block's 8 words as one ``[.., 8]`` tensor, so each load instruction reads
      whole 32-byte sectors (two threads a block), then hand the halves to one thread (shuffles);
    - WIDE_STORE: ``data_ptr`` is an int64 view of the packed bytes (strides in 8-byte words) and
      a block's 8 code bytes are stored as one int64 word instead of two 4-byte stores;
    - LOAD_CACHE / LOAD_EVICT / STORE_CACHE: PTX cache modifier and eviction policy of the input
      loads, cache modifier of the stores (``""``: the default);
    - PERSISTENT: the grid's first axis is a fixed number of programs that stride over the row
      tiles, in a loop software-pipelined over STAGES stages.
    """
    if PERSISTENT:
        # Tiles program_id(0) + i * num_programs(0) < cdiv(n_rows, ROWS); no tl.cdiv, a @jit function
        # that an interpreted copy of this module cannot call in a compiled-mode process (CPU tests).
        programs = tl.num_programs(0)
        n_tiles = ((n_rows + ROWS - 1) // ROWS - tl.program_id(0) + programs - 1) // programs
    else:
        n_tiles = 1  # a constant one-trip loop: the compiler folds it away
    for i in tl.range(0, n_tiles, num_stages=STAGES):
        tile = tl.program_id(0) + i * tl.num_programs(0)
        row_ok, token, head, blocks, block_ok, quad = _tile(tile, n_rows, heads, n_blocks, ROWS, BLOCKS, 4)
        if SCATTER:
            slot = tl.load(loc_ptr + token, mask=row_ok, other=0).to(tl.int64)
        else:
            slot = token.to(tl.int64)
        src = x_ptr + (token.to(tl.int64) * x_stride_tok + head * x_stride_head)[:, None, None]
        mask = block_ok[:, :, None]
        if WHOLE_LOAD:
            octet = blocks[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
            word = tl.load(
                src + octet, mask=mask, other=0, cache_modifier=LOAD_CACHE, eviction_policy=LOAD_EVICT
            )
            # [.., 8] -> [.., lane 4, half 2]: split hands each half to the thread owning the block.
            w0, w1 = tl.split(tl.reshape(word, [ROWS, BLOCKS, 2, 4]).permute(0, 1, 3, 2))
        else:
            w0 = tl.load(
                src + quad, mask=mask, other=0, cache_modifier=LOAD_CACHE, eviction_policy=LOAD_EVICT
            )
            w1 = tl.load(
                src + quad + 4, mask=mask, other=0, cache_modifier=LOAD_CACHE, eviction_policy=LOAD_EVICT
            )
        x0, x1 = _unpack_pairs(w0, IN_KIND)
        x2, x3 = _unpack_pairs(w1, IN_KIND)
        # The block maximum halves the lane axis twice with tl.split, in registers (the default
        # launch compiles to what tl.reduce gives); after WHOLE_LOAD's regrouping a reduce would let
        # the compiler redo the unpacking in a layout that spreads the lanes over threads.
        pair_max = tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))
        a, b = tl.split(tl.reshape(pair_max, [ROWS, BLOCKS, 2, 2]))
        a, b = tl.split(tl.maximum(a, b))
        block_max = tl.maximum(a, b)

        if FMT == 0:
            scale_byte, r = _nvfp4_scale(block_max, tl.load(g_ptr), 0.16666667163372040)
        elif FMT == 2:
            # NVFP4 4 over 6: the max -> 4 candidate where its writer error is strictly smaller.
            g = tl.load(g_ptr)
            scale6, r6 = _nvfp4_scale(block_max, g, 0.16666667163372040)
            scale4, r4 = _nvfp4_scale(block_max, g, 0.25)
            err6 = _writer_error(x0, x1, x2, x3, r6)
            err4 = _writer_error(x0, x1, x2, x3, r4)
            use4 = err4 < err6
            scale_byte = tl.where(use4, scale4, scale6)
            r = tl.where(use4, r4, r6)
        else:
            # BlockFP4: e = clamp(ceil(log2(bmax / 6)), -127, 127) with frexp semantics; r = 2^-e.
            ratio = tl.math.div_rn(block_max, tl.full(block_max.shape, 6.0, tl.float32))
            rb = ratio.to(tl.int32, bitcast=True)
            biased = rb >> 23
            normal = biased - 127 + ((rb & 0x7FFFFF) != 0).to(tl.int32)
            subnormal = tl.where(rb > 0x00400000, -126, -127)
            e = tl.where(biased == 0, subnormal, normal)
            e = tl.where(rb == 0, 0, e)
            e = tl.minimum(tl.maximum(e, -127), 127)
            scale_byte = tl.where(block_max == 0.0, 0, e + 127)
            r = tl.where(scale_byte == 254, 0x00400000, (254 - scale_byte) << 23).to(tl.float32, bitcast=True)

        r3 = r[:, :, None]
        dst = slot * data_stride_tok + head * data_stride_head
        if WIDE_STORE:
            # Little-endian int64 whose byte j is pair j's code: merge neighbouring codes into 16-,
            # then 32-bit values (each split halves an axis a thread holds whole: no data movement).
            codes = tl.join(_encode_pairs(x0, x1, r3), _encode_pairs(x2, x3, r3))
            codes = tl.reshape(codes.permute(0, 1, 3, 2), [ROWS, BLOCKS, 4, 2])
            even, odd = tl.split(codes)
            even, odd = tl.split(tl.reshape(even | (odd << 8), [ROWS, BLOCKS, 2, 2]))
            low, high = tl.split(even | (odd << 16))
            packed = low.to(tl.uint32, bitcast=True).to(tl.int64) | (high.to(tl.int64) << 32)
            # Contiguity 1 keeps the store in the compute layout (8 threads on 8 consecutive words);
            # inferred as 2, it would take 2 words a thread, shuffled there, stored half a sector each.
            words = tl.max_contiguous(dst[:, None] + blocks[None, :], [1, 1])
            tl.store(data_ptr + words, packed, mask=block_ok, cache_modifier=STORE_CACHE)
        else:
            dst = data_ptr + dst[:, None, None] + quad
            # Each half is encoded right before its store: fewer live registers than encoding both first.
            tl.store(dst, _encode_pairs(x0, x1, r3).to(tl.uint8), mask=mask, cache_modifier=STORE_CACHE)
            tl.store(dst + 4, _encode_pairs(x2, x3, r3).to(tl.uint8), mask=mask, cache_modifier=STORE_CACHE)
        scale_dst = slot * scale_stride_tok + head * scale_stride_head
        scale_at = scale_dst[:, None] + blocks[None, :]
        if WIDE_STORE:
            scale_at = tl.max_contiguous(scale_at, [1, 1])  # as for the words: no shuffle before the store
        tl.store(scale_ptr + scale_at, scale_byte.to(tl.uint8), mask=block_ok, cache_modifier=STORE_CACHE)


@triton.jit
def _dequantize_kernel(
    data_ptr,
    scale_ptr,
    g_ptr,
    loc_ptr,
    out_ptr,
    n_rows,
    heads,
    n_blocks,
    data_stride_tok,
    data_stride_head,
    scale_stride_tok,
    scale_stride_head,
    out_stride_tok,
    out_stride_head,
    NVFP4: tl.constexpr,
    OUT_KIND: tl.constexpr,
    GATHER: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    """Rows ``(token, head)`` read from slot ``loc[token]`` when GATHER else ``token`` -> out pair words."""
    row_ok, token, head, blocks, block_ok, pair = _tile(
        tl.program_id(0), n_rows, heads, n_blocks, ROWS, BLOCKS, 8
    )
    if GATHER:
        slot = tl.load(loc_ptr + token, mask=row_ok, other=0).to(tl.int64)
    else:
        slot = token.to(tl.int64)
    mask = block_ok[:, :, None]
    src = slot * data_stride_tok + head * data_stride_head
    packed = tl.load(data_ptr + (src[:, None, None] + pair), mask=mask, other=0).to(tl.int32)
    scale_src = slot * scale_stride_tok + head * scale_stride_head
    scale_byte = tl.load(scale_ptr + (scale_src[:, None] + blocks[None, :]), mask=block_ok, other=0).to(
        tl.int32
    )
    lo, hi = _decode_pairs(packed, scale_byte, g_ptr, NVFP4)
    if OUT_KIND == 2:
        word = lo.to(tl.uint32, bitcast=True).to(tl.int64) | (
            hi.to(tl.int32, bitcast=True).to(tl.int64) << 32
        )
    else:
        word = _half_bits(lo, OUT_KIND, SOFT_BF16) | (_half_bits(hi, OUT_KIND, SOFT_BF16) << 16)
    dst = token.to(tl.int64) * out_stride_tok + head * out_stride_head
    tl.store(out_ptr + (dst[:, None, None] + pair), word, mask=mask)


#: True when the kernels were decorated under ``TRITON_INTERPRET=1`` (they then take CPU tensors).
INTERPRETED = isinstance(_quantize_kernel, InterpretedFunction)


def _tile_shape(n_blocks: int, tile_elements: int) -> tuple[int, int]:
    """``(ROWS, BLOCKS)`` of one program of ``tile_elements`` for rows of ``n_blocks`` 16-element blocks."""
    blocks = min(triton.next_power_of_2(n_blocks), MAX_TILE_BLOCKS)
    # Rows per program do not follow n_rows, so a decode step of any batch reuses one compiled kernel.
    return max(1, tile_elements // (blocks * FP4_BLOCK_SIZE)), blocks


def _pair_words(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` (16-bit or fp32, last dim contiguous) viewed as int32/int64 words ``[..., K/2]``."""
    word = torch.int32 if x.element_size() == 2 else torch.int64
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(word)
    except RuntimeError:  # odd storage offset or stride: a fresh copy is aligned
        return x.clone(memory_format=torch.contiguous_format).view(word)


def _check_rows(x: torch.Tensor) -> None:
    if x.shape[-1] % FP4_BLOCK_SIZE:
        raise ValueError(
            f"expected the last dimension to be a multiple of {FP4_BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )


def _global(fmt: str, global_scale: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if fmt not in NVFP4_WRITERS:
        return None
    if global_scale is None:
        raise ValueError("nvfp4 needs a global scale g; pass k_scale/v_scale or load calibrated scales")
    return as_global_scale(global_scale, device)


@cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (looked up once per device; kernels launch per layer
    and step). The CPU interpreter counts as one SM, so the CPU tests run several tiles a program."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


class TritonBackend(TorchBackend):
    """NVFP4 / BlockFP4 on CUDA (compute capability >= 8.0) with the Triton kernels above.

    Same contract and bytes as :class:`TorchBackend`: ``x [M, K]`` bf16/fp16/fp32 ->
    ``packed [M, K/2]`` uint8 + ``scales [M, K/16]`` uint8; cache buffers
    ``[slots, heads, K/2]`` / ``[slots, heads, K/16]`` uint8 written/read at ``loc [N]`` int64.
    Inputs the kernels cannot address (a buffer whose rows are not contiguous) take the
    reference path.
    """

    name = "triton"

    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)

    def _runs_here(self, *tensors: torch.Tensor) -> bool:
        return all(t.is_cuda or INTERPRETED for t in tensors)

    def quantize(
        self, fmt: str, x: torch.Tensor, global_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``x [M, K]`` to ``(packed [M, K/2], scales [M, K/16])`` uint8 in ``fmt``."""
        if x.dim() != 2 or not self._runs_here(x):
            return super().quantize(fmt, x, global_scale)
        _check_rows(x)
        m, k = x.shape
        packed = torch.empty(m, k // 2, dtype=torch.uint8, device=x.device)
        scales = torch.empty(m, k // FP4_BLOCK_SIZE, dtype=torch.uint8, device=x.device)
        self._launch_quantize(
            fmt, x.unsqueeze(1), packed.unsqueeze(1), scales.unsqueeze(1), None, global_scale
        )
        return packed, scales

    def dequantize(
        self,
        fmt: str,
        packed: torch.Tensor,
        scales: torch.Tensor,
        global_scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Decode ``packed [M, K/2]`` + ``scales [M, K/16]`` to ``[M, K]`` of ``dtype``."""
        if packed.dim() != 2 or scales.dim() != 2 or not self._runs_here(packed, scales):
            return super().dequantize(fmt, packed, scales, global_scale, dtype)
        return self.dequantize_gather(
            fmt, packed.unsqueeze(1), scales.unsqueeze(1), None, global_scale, dtype
        )[:, 0]

    def quantize_and_store(
        self,
        fmt: str,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor,
        loc: torch.Tensor,
        x: torch.Tensor,
        global_scale: torch.Tensor | None,
    ) -> None:
        """Quantize ``x [N, H, K]`` and write rows into buffer slots ``loc [N]`` in one kernel."""
        if not (
            self._runs_here(x, data_buffer, scale_buffer) and _rows_contiguous(data_buffer, scale_buffer)
        ):
            super().quantize_and_store(fmt, data_buffer, scale_buffer, loc, x, global_scale)
            return
        _check_rows(x)
        if loc.numel() != x.shape[0]:
            raise ValueError(f"loc has {loc.numel()} slots for {x.shape[0]} rows of x")
        loc = loc.to(device=x.device, dtype=torch.int64).contiguous()
        self._launch_quantize(fmt, x, data_buffer, scale_buffer, loc, global_scale)

    def quantize_store_readback(
        self,
        fmt: str,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor,
        loc: torch.Tensor,
        x: torch.Tensor,
        global_scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The store kernel, then the gather kernel of the same slots (one launch each)."""
        self.quantize_and_store(fmt, data_buffer, scale_buffer, loc, x, global_scale)
        return self.dequantize_gather(fmt, data_buffer, scale_buffer, loc, global_scale, dtype)

    def quantize_store_readback_pair(
        self,
        fmt: str,
        buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        loc: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_global: torch.Tensor | None,
        v_global: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, then V, through :meth:`quantize_store_readback` (the kernels)."""
        k_data, k_scales, v_data, v_scales = buffers
        return (
            self.quantize_store_readback(fmt, k_data, k_scales, loc, k, k_global, dtype),
            self.quantize_store_readback(fmt, v_data, v_scales, loc, v, v_global, dtype),
        )

    def dequantize_gather(
        self,
        fmt: str,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor,
        loc: torch.Tensor | None,
        global_scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Decode buffer slots ``loc [N]`` (all slots if None) to ``[N, H, K]`` of ``dtype`` in one kernel."""
        if not (self._runs_here(data_buffer, scale_buffer) and _rows_contiguous(data_buffer, scale_buffer)):
            return super().dequantize_gather(fmt, data_buffer, scale_buffer, loc, global_scale, dtype)
        if dtype not in _DTYPE_IDS:  # e.g. float64: the reference rounds fp32 values to dtype too
            return self.dequantize_gather(
                fmt, data_buffer, scale_buffer, loc, global_scale, torch.float32
            ).to(dtype)
        slots, heads, half = data_buffer.shape
        if scale_buffer.shape != (slots, heads, half * 2 // FP4_BLOCK_SIZE):
            raise ValueError(
                f"packed [.., H, K/2] and scales [.., H, K/16] disagree: {tuple(data_buffer.shape)} vs "
                f"{tuple(scale_buffer.shape)}"
            )
        n = slots if loc is None else loc.numel()
        out = torch.empty(n, heads, half * 2, dtype=dtype, device=data_buffer.device)
        if out.numel() == 0:
            return out
        g = _global(fmt, global_scale, data_buffer.device)
        if loc is not None:
            loc = loc.to(device=data_buffer.device, dtype=torch.int64).contiguous()
        words = out.view(torch.int32 if dtype != torch.float32 else torch.int64)
        n_rows, n_blocks = n * heads, half * 2 // FP4_BLOCK_SIZE
        rows, blocks = _tile_shape(n_blocks, DEQUANTIZE_TILE_ELEMENTS)
        scale_bytes = scale_buffer.view(torch.uint8)
        _dequantize_kernel[(triton.cdiv(n_rows, rows), triton.cdiv(n_blocks, blocks))](
            data_buffer,
            scale_bytes,
            data_buffer if g is None else g,
            data_buffer if loc is None else loc,
            words,
            n_rows,
            heads,
            n_blocks,
            data_buffer.stride(0),
            data_buffer.stride(1),
            scale_bytes.stride(0),
            scale_bytes.stride(1),
            words.stride(0),
            words.stride(1),
            NVFP4=read_layout(fmt) == "nvfp4",
            OUT_KIND=_DTYPE_IDS[dtype],
            GATHER=loc is not None,
            SOFT_BF16=INTERPRETED,
            ROWS=rows,
            BLOCKS=blocks,
            num_warps=DEQUANTIZE_WARPS,
            enable_fp_fusion=False,
        )
        return out

    def _launch_quantize(
        self,
        fmt: str,
        x: torch.Tensor,
        data: torch.Tensor,
        scales: torch.Tensor,
        loc: torch.Tensor | None,
        global_scale: torch.Tensor | None,
    ) -> None:
        """Run :func:`_quantize_kernel` on ``x [N, H, K]`` into ``data``/``scales`` ``[slots, H, ...]``."""
        if x.dtype not in _DTYPE_IDS:  # e.g. float64: the reference casts to fp32 first
            x = x.to(torch.float32)
        n, heads, dim = x.shape
        if n * heads == 0:
            return
        g = _global(fmt, global_scale, x.device)
        words = _pair_words(x)
        n_rows, n_blocks = n * heads, dim // FP4_BLOCK_SIZE
        rows, blocks = _tile_shape(n_blocks, QUANTIZE_TILE_ELEMENTS)
        scale_bytes = scales.view(torch.uint8)
        packed = data
        # A block's 8 code bytes are one int64 word when every row starts 8-byte aligned.
        if QUANTIZE_WIDE_STORE and data.data_ptr() % 8 == 0:
            try:
                packed = data.view(torch.int64)
            except RuntimeError:  # a storage offset or row stride that is not a multiple of 8 bytes
                pass
        programs = triton.cdiv(n_rows, rows)
        if QUANTIZE_PROGRAMS_PER_SM:
            programs = min(programs, QUANTIZE_PROGRAMS_PER_SM * sm_count(x.device))
        _quantize_kernel[(programs, triton.cdiv(n_blocks, blocks))](
            words,
            packed,
            scale_bytes,
            x if g is None else g,
            x if loc is None else loc,
            n_rows,
            heads,
            n_blocks,
            words.stride(0),
            words.stride(1),
            packed.stride(0),
            packed.stride(1),
            scale_bytes.stride(0),
            scale_bytes.stride(1),
            FMT=_FORMAT_IDS[fmt],
            IN_KIND=_DTYPE_IDS[x.dtype],
            SCATTER=loc is not None,
            ROWS=rows,
            BLOCKS=blocks,
            WHOLE_LOAD=QUANTIZE_WHOLE_LOAD,
            WIDE_STORE=packed is not data,
            LOAD_CACHE=QUANTIZE_LOAD_CACHE,
            LOAD_EVICT=QUANTIZE_LOAD_EVICT,
            STORE_CACHE=QUANTIZE_STORE_CACHE,
            PERSISTENT=QUANTIZE_PROGRAMS_PER_SM > 0,
            STAGES=QUANTIZE_STAGES,
            num_warps=QUANTIZE_WARPS,
            enable_fp_fusion=False,
        )


def _rows_contiguous(data: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether each ``[slot, head]`` row of the buffers is contiguous bytes (what the kernels address)."""
    return data.dim() == 3 and scales.dim() == 3 and data.stride(2) == 1 and scales.stride(2) == 1


__all__ = ["INTERPRETED", "TritonBackend"]
