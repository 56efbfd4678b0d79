"""Public quantize/dequantize utilities on plain 2-D tensors, dispatched to the active backend."""

from __future__ import annotations

import torch

from fp4kv_cli.quant.backend import get_backend
from fp4kv_cli.quant.reference import as_global_scale


class NVFP4KVQuantizeUtil:
    """NVFP4 on ``[M, K]`` tensors: E2M1 codes, E4M3 scale per 16, FP32 global dequant scale."""

    @staticmethod
    def quantize(x: torch.Tensor, global_scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``x [M, K]`` (bf16/fp16/fp32, K % 16 == 0) with global dequant scale ``g``.

        Returns packed ``[M, K/2]`` uint8 (low nibble = even element) and E4M3 scale bytes
        ``[M, K/16]`` uint8.
        """
        g = as_global_scale(global_scale, x.device)
        return get_backend(x.device).quantize("nvfp4", x, g)

    @staticmethod
    def dequantize(
        packed: torch.Tensor,
        scales: torch.Tensor,
        global_scale: float | torch.Tensor,
        dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """Decode ``packed [M, K/2]`` + ``scales [M, K/16]`` to ``[M, K]`` of ``dtype``."""
        g = as_global_scale(global_scale, packed.device)
        return get_backend(packed.device).dequantize("nvfp4", packed, scales, g, dtype)


class BlockFP4KVQuantizeUtil:
    """Block FP4 on ``[M, K]`` tensors: E2M1 codes, UE8M0 power-of-two scale per 16."""

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``x [M, K]``; returns packed ``[M, K/2]`` uint8 and UE8M0 bytes ``[M, K/16]``."""
        return get_backend(x.device).quantize("blockfp4", x, None)

    @staticmethod
    def dequantize(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Decode ``packed [M, K/2]`` + ``scales [M, K/16]`` to ``[M, K]`` of ``dtype``."""
        return get_backend(packed.device).dequantize("blockfp4", packed, scales, None, dtype)
