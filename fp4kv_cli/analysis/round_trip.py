"""Quantize-then-dequantize through a quant method, and a method that applies it to chosen heads.

The round trip uses the method's own ``create_buffers`` / ``store`` / ``dequantize``, so the
values are exactly those a cache of that format reads back. Blocks never straddle heads, so
quantizing a subset of heads gives those heads the same values as quantizing all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fp4kv_cli.quant.methods import BF16KVMethod, Buffers, KVCacheMethod


def round_trip(method: KVCacheMethod, x: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """``x [N, heads, head_dim]`` stored in ``method`` and read back as float32 of the same shape."""
    n, heads, dim = x.shape
    buffers = method.create_buffers(n, heads, dim, 1, x.device)
    data = buffers["k_buffer"][0]
    scales = buffers["k_scale_buffer"][0] if buffers["k_scale_buffer"] else None
    loc = torch.arange(n, device=x.device)
    method.store(data, scales, loc, x, scale)
    return method.dequantize(data, scales, None, scale, torch.float32)


class HeadSubsetMethod(KVCacheMethod):
    """Stores bf16, but the chosen KV heads hold the values ``base`` would read back.

    Used to measure one head's (or layer's) sensitivity to a format in isolation; the scale it
    takes is the base method's per-tensor scale for the layer.
    """

    name: ClassVar[str] = "head-subset"
    bits_per_element: ClassVar[float] = 16.0

    def __init__(
        self, base: KVCacheMethod, heads: list[int] | None = None, dtype: torch.dtype = torch.bfloat16
    ):
        self.base = base
        self.heads = heads
        self.storage = BF16KVMethod(dtype)
        self.uses_tensor_scale = base.uses_tensor_scale  # type: ignore[misc]

    def create_buffers(
        self, size: int, head_num: int, head_dim: int, layer_num: int, device: torch.device | str
    ) -> Buffers:
        return self.storage.create_buffers(size, head_num, head_dim, layer_num, device)

    def compute_cell_size(self, head_num: int, head_dim: int, num_layers: int, kv_size: int = 2) -> int:
        return self.storage.compute_cell_size(head_num, head_dim, num_layers, kv_size)

    def scale_from_amax(self, amax: float | Sequence[float] | torch.Tensor) -> torch.Tensor | None:
        """The base method's scale."""
        return self.base.scale_from_amax(amax)

    def store(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
    ) -> None:
        heads = slice(None) if self.heads is None else self.heads
        quantized = x.to(torch.float32).clone()
        quantized[:, heads] = round_trip(self.base, x[:, heads].contiguous(), scale)
        self.storage.store(data_buffer, None, loc, quantized, None)

    def dequantize(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor | None = None,
        global_scale: float | torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        return self.storage.dequantize(data_buffer, None, loc, None, dtype)
