"""Decode attention that reads K and V straight from the cache buffers (Triton, SM80+).

One query token per sequence attends to the ``length`` filled slots of its row of the cache
(slot ``b * capacity + t``), with the K and V formats of the quant methods: ``bf16`` (raw 16-bit or
fp32 values), ``fp8`` (per-tensor E4M3), ``nvfp4`` (E2M1 x E4M3 block scale x global scale) and
``blockfp4`` (E2M1 x UE8M0). Each tile is decoded in registers to exactly the values the method's
``dequantize`` returns (same fp32 products, same rounding to the model dtype), so this is the
attention of the gather-then-attend path without writing the decoded prefix to memory: the
kernel reads 0.5625 bytes per element for FP4 instead of 2.

Flash-decoding layout: a program handles one (sequence, KV head, split of the tokens) and all the
query heads of that KV head (GQA packed into the rows of one ``tl.dot``); an online softmax runs
over blocks of ``BLOCK_N`` tokens; when the tokens are split, a second kernel merges the partial
results. Masked tokens (the boolean attention mask, e.g. left padding) get zero weight. Scores
and the softmax are fp32; the probabilities are rounded to the model dtype before ``P @ V``, as
flash attention does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

from fp4kv_cli.quant.kernels.triton_fp4 import (
    _DTYPE_IDS,
    INTERPRETED,
    _decode_pairs,
    _e4m3_decode,
    _half_bits,
    sm_count,
)

#: Kernel format ids of the quant methods whose buffers the kernel reads, by method name.
FORMAT_IDS = {"bf16": 0, "fp8": 1, "nvfp4": 2, "blockfp4": 3}
#: Tokens per inner-loop block.
BLOCK_N = 64
#: Warps per program.
NUM_WARPS = 4
#: Programs per streaming multiprocessor the token splits aim for.
PROGRAMS_PER_SM = 2
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KVSource:
    """One layer's K or V buffers as a quant method laid them out.

    Attributes
    ----------
    fmt:
        The method's name (a key of :data:`FORMAT_IDS`).
    data:
        ``[slots, heads, head_dim]`` values (bf16 / fp8) or ``[slots, heads, head_dim/2]`` packed E2M1.
    block_scales:
        ``[slots, heads, head_dim/16]`` uint8 scale bytes for FP4 formats, else None.
    tensor_scale:
        0-dim float32 per-tensor scale (fp8 ``s``, nvfp4 ``g``), else None.
    """

    fmt: str
    data: torch.Tensor
    block_scales: torch.Tensor | None = None
    tensor_scale: torch.Tensor | None = None


@triton.jit
def _round(v, KIND: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 ``v`` rounded (nearest even) to the model dtype (KIND 0 bf16, 1 fp16, 2 fp32); the
    interpreter's fp32 -> bf16 conversion truncates, so there the rounding is integer code."""
    if KIND == 0:
        out = _half_bits(v, 0, INTERPRETER).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif KIND == 1:
        out = v.to(tl.float16)
    else:
        out = v
    return out


# Reductions pass triton's own max / sum combines to tl.reduce instead of calling tl.max /
# tl.sum: those are library functions compiled on import, which an interpreted copy of this module
# (the CPU tests, in a process that imported triton.language compiled) cannot call, while the
# interpreter recognises these combines and reduces with numpy.
_max_combine = tl.standard._elementwise_max
_add_combine = tl.standard._sum_combine


@triton.jit
def _dot(a, b, KIND: tl.constexpr, INTERPRETER: tl.constexpr):
    """fp32 ``a @ b``: tensor cores on 16-bit inputs; exact fp32 products for fp32 inputs and under
    the interpreter (whose 16-bit ``tl.dot`` is wrong; 16-bit values widen to fp32 exactly)."""
    if KIND == 2 or INTERPRETER:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _load_tile(
    data_ptr,
    scale_ptr,
    tensor_scale_ptr,
    slot,
    head,
    valid,
    stride_tok,
    stride_head,
    scale_stride_tok,
    scale_stride_head,
    FMT: tl.constexpr,
    KIND: tl.constexpr,
    INTERPRETER: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``[BLOCK, D]`` values of slots ``slot [BLOCK]`` (head ``head``) in the model dtype, as the
    method's dequantize returns them; invalid rows read as 0."""
    row = slot * stride_tok + head * stride_head
    if FMT == 0:
        tile = tl.load(data_ptr + row[:, None] + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0)
    elif FMT == 1:
        byte = tl.load(data_ptr + row[:, None] + tl.arange(0, D)[None, :], mask=valid[:, None], other=0)
        tile = _round(_e4m3_decode(byte.to(tl.int32)) * tl.load(tensor_scale_ptr), KIND, INTERPRETER)
    else:
        NB: tl.constexpr = D // 16
        pair = tl.arange(0, NB)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        packed = tl.load(data_ptr + row[:, None, None] + pair, mask=valid[:, None, None], other=0).to(
            tl.int32
        )
        srow = slot * scale_stride_tok + head * scale_stride_head
        sbyte = tl.load(scale_ptr + srow[:, None] + tl.arange(0, NB)[None, :], mask=valid[:, None], other=0)
        lo, hi = _decode_pairs(packed, sbyte.to(tl.int32), tensor_scale_ptr, FMT == 2)
        tile = tl.reshape(tl.join(_round(lo, KIND, INTERPRETER), _round(hi, KIND, INTERPRETER)), (BLOCK, D))
    return tile


@triton.jit
def _decode_attention_kernel(
    q_ptr,
    k_ptr,
    k_scale_ptr,
    k_tensor_scale_ptr,
    v_ptr,
    v_scale_ptr,
    v_tensor_scale_ptr,
    mask_ptr,
    out_ptr,
    part_ptr,
    stats_ptr,
    length,
    capacity,
    kv_heads,
    group,
    tokens_per_split,
    qk_scale,
    q_stride_b,
    q_stride_h,
    k_stride_tok,
    k_stride_head,
    k_scale_stride_tok,
    k_scale_stride_head,
    v_stride_tok,
    v_stride_head,
    v_scale_stride_tok,
    v_scale_stride_head,
    mask_stride_b,
    K_FMT: tl.constexpr,
    V_FMT: tl.constexpr,
    KIND: tl.constexpr,
    INTERPRETER: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SPLIT: tl.constexpr,
    D: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program ``(b, kv_head, split)``: attention of the ``group`` query heads of ``kv_head`` over
    tokens ``[split * tokens_per_split, ...)`` of row ``b``. Writes the normalised output when not
    SPLIT, else the unnormalised partial output and its (max, sum) for the merge kernel."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, GROUP_ROWS)
    row_ok = rows < group
    heads = kv_head * group + rows
    dims = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    m_i = tl.full((GROUP_ROWS,), -1.0e30, tl.float32)
    l_i = tl.full((GROUP_ROWS,), 0.0, tl.float32)
    acc = tl.full((GROUP_ROWS, D), 0.0, tl.float32)
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, length)
    for block_start in range(start, stop, BLOCK):
        t = block_start + tl.arange(0, BLOCK)
        valid = t < stop
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * mask_stride_b + t, mask=valid, other=0) != 0)
        slot = (b * capacity + t).to(tl.int64)
        k = _load_tile(k_ptr, k_scale_ptr, k_tensor_scale_ptr, slot, kv_head, valid, k_stride_tok, k_stride_head,
                       k_scale_stride_tok, k_scale_stride_head, K_FMT, KIND, INTERPRETER, D, BLOCK)  # fmt: skip
        scores = _dot(q, tl.trans(k), KIND, INTERPRETER)
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(scores, 1, _max_combine))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _add_combine)
        v = _load_tile(v_ptr, v_scale_ptr, v_tensor_scale_ptr, slot, kv_head, valid, v_stride_tok, v_stride_head,
                       v_scale_stride_tok, v_scale_stride_head, V_FMT, KIND, INTERPRETER, D, BLOCK)  # fmt: skip
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, KIND, INTERPRETER)
        m_i = m_new
    num_heads = kv_heads * group
    if SPLIT:
        splits = tl.num_programs(2)
        part = (b * num_heads + heads) * splits + split
        tl.store(part_ptr + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(stats_ptr + part * 2, m_i, mask=row_ok)
        tl.store(stats_ptr + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / l_i[:, None]
        dst = out_ptr + (b * num_heads + heads)[:, None] * D + dims[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(part_ptr, stats_ptr, out_ptr, splits, D: tl.constexpr, SPLITS: tl.constexpr):
    """Program ``(b * heads + h)``: merge the ``splits`` partial outputs of one query head."""
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    ok = s < splits
    m = tl.load(stats_ptr + (row * splits + s) * 2, mask=ok, other=-1.0e30)
    l_part = tl.load(stats_ptr + (row * splits + s) * 2 + 1, mask=ok, other=0.0)
    weight = tl.exp2(m - tl.reduce(m, 0, _max_combine))
    dims = tl.arange(0, D)
    part = tl.load(part_ptr + (row * splits + s)[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
    out = tl.reduce(part * weight[:, None], 0, _add_combine) / tl.reduce(l_part * weight, 0, _add_combine)
    tl.store(out_ptr + row * D + dims, out.to(out_ptr.dtype.element_ty))


def can_read(
    fmt: str, buffer_dtype: torch.dtype, model_dtype: torch.dtype, head_dim: int, device: torch.device
) -> bool:
    """Whether :func:`decode_attention` reads buffers of format ``fmt`` (holding ``buffer_dtype``)
    for a ``model_dtype`` query of ``head_dim`` on ``device``."""
    return (
        (device.type == "cuda" or INTERPRETED)
        and model_dtype in _DTYPE_IDS
        and fmt in FORMAT_IDS
        and (fmt != "bf16" or buffer_dtype == model_dtype)
        and 16 <= head_dim <= 256
        and head_dim & (head_dim - 1) == 0
    )


def decode_attention(
    q: torch.Tensor,
    k: KVSource,
    v: KVSource,
    length: int,
    capacity: int,
    mask: torch.Tensor | None,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over the cache's filled slots.

    Parameters
    ----------
    q:
        ``[batch, q_heads, head_dim]`` queries (bf16 / fp16 / fp32), the model dtype; ``q_heads``
        is a multiple of the buffers' KV heads (GQA).
    k, v:
        The layer's buffers, slot ``b * capacity + t`` for token ``t`` of sequence ``b``.
    length:
        Filled tokens per sequence (the query's own included).
    capacity:
        Slots per sequence in the buffers (sequence ``b``'s token ``t`` is slot ``b * capacity + t``).
    mask:
        ``[batch, length]`` (or ``[1, length]`` for every row) bool, True = attend; None for all.
    scale:
        Softmax scale (``1/sqrt(head_dim)`` for most models).
    num_splits:
        Token splits per (sequence, KV head); default: enough programs to fill the device.

    Returns ``[batch, q_heads, head_dim]`` in ``q``'s dtype.
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    batch, q_heads, dim = q.shape
    kv_heads = k.data.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    group = q_heads // kv_heads
    blocks = triton.cdiv(length, BLOCK_N)
    if num_splits is None:
        num_splits = triton.cdiv(_device_programs(q.device), batch * kv_heads)
    num_splits = max(1, min(num_splits, blocks))
    tokens_per_split = triton.cdiv(blocks, num_splits) * BLOCK_N
    num_splits = triton.cdiv(length, tokens_per_split)
    out = torch.empty(batch, q_heads, dim, dtype=q.dtype, device=q.device)
    split = num_splits > 1
    # Partial outputs and their (max, sum) per split; unused (the output pointer stands in) without splits.
    part = (
        torch.empty(batch * q_heads * num_splits, dim, dtype=torch.float32, device=q.device) if split else out
    )
    stats = (
        torch.empty(batch * q_heads * num_splits, 2, dtype=torch.float32, device=q.device) if split else out
    )
    if mask is not None:
        if mask.dim() != 2 or mask.shape[1] != length or mask.shape[0] not in (1, batch):
            raise ValueError(f"mask must be [batch, length] = {(batch, length)}, got {tuple(mask.shape)}")
        mask = mask.to(torch.bool).expand(batch, length)  # a broadcast row: batch stride 0
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    k_args, v_args = _buffer_args(k, q), _buffer_args(v, q)
    _decode_attention_kernel[(batch, kv_heads, num_splits)](
        q,
        *k_args[:3],
        *v_args[:3],
        q if mask is None else mask,
        out,
        part,
        stats,
        length,
        capacity,
        kv_heads,
        group,
        tokens_per_split,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        *k_args[3:],
        *v_args[3:],
        0 if mask is None else mask.stride(0),
        K_FMT=FORMAT_IDS[k.fmt],
        V_FMT=FORMAT_IDS[v.fmt],
        KIND=_DTYPE_IDS[q.dtype],
        INTERPRETER=INTERPRETED,
        HAS_MASK=mask is not None,
        SPLIT=split,
        D=dim,
        GROUP_ROWS=max(16, triton.next_power_of_2(group)),
        BLOCK=BLOCK_N,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    if split:
        _merge_splits_kernel[(batch * q_heads,)](
            part, stats, out, num_splits, D=dim, SPLITS=triton.next_power_of_2(num_splits)
        )
    return out


def _buffer_args(source: KVSource, q: torch.Tensor) -> tuple:
    """(data, block scales, tensor scale, 4 strides) kernel arguments of one K or V source."""
    data = source.data.view(torch.uint8) if source.data.dtype == torch.float8_e4m3fn else source.data
    if source.fmt == "bf16" and data.dtype != q.dtype:
        raise ValueError(f"bf16 buffers hold {data.dtype} but the query is {q.dtype}")
    scales = source.block_scales
    tensor_scale = source.tensor_scale
    if tensor_scale is not None:
        tensor_scale = tensor_scale.to(device=q.device, dtype=torch.float32).reshape(())
    elif source.fmt in ("fp8", "nvfp4"):
        raise ValueError(f"{source.fmt} buffers need their per-tensor scale")
    return (
        data,
        data if scales is None else scales,
        data if tensor_scale is None else tensor_scale,
        data.stride(0),
        data.stride(1),
        0 if scales is None else scales.stride(0),
        0 if scales is None else scales.stride(1),
    )


@cache
def _device_programs(device: torch.device) -> int:
    """Programs that fill ``device`` (a few on the CPU interpreter, to exercise the splits)."""
    if device.type != "cuda":
        return 4
    return PROGRAMS_PER_SM * sm_count(device)


__all__ = ["FORMAT_IDS", "KVSource", "can_read", "decode_attention"]
