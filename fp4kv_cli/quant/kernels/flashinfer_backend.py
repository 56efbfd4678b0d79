"""FlashInfer's NVFP4 KV kernels behind the backend API, with the Triton kernels for the rest.

FlashInfer (``flashinfer-python`` >= 0.7) offers, for the linear (non-swizzled) scale layout:

- ``nvfp4_kv_dequantize(fp4_data [M, K/2] uint8, block_scales [M, K/16] uint8, global_scale [1]
  float32, output_dtype bf16|fp16) -> [M, K]`` on SM80+. It computes ``(E2M1 * sf) * g`` in fp32
  and rounds to nearest, the reference's order, so its output is bit-identical to ours.
- ``nvfp4_kv_quantize(input [M, K] bf16|fp16, global_scale [1] float32) -> (fp4 [M, K/2],
  scales [M, K/16])`` on SM100+ only (it needs ``cvt.rn.satfinite.e2m1x2.f32``). It takes the
  *dequant* global scale ``g`` (it inverts it itself), unlike ``fp4_quantize``, which takes
  ``1/g``. Its reciprocals are ``rcp.approx.ftz``, so rare blocks may differ from the reference
  by one code; ``fp4kv bench kernels`` reports whether its bytes match.

Everything else (BlockFP4, fp32 input or output, quantize below SM100, the fused store) runs on
the Triton kernels this class inherits.
"""

from __future__ import annotations

from types import ModuleType

import torch

from fp4kv_cli.quant.backend import BackendUnavailableError, TorchBackend, read_layout
from fp4kv_cli.quant.kernels.triton_fp4 import TritonBackend
from fp4kv_cli.quant.reference import as_global_scale

#: Output dtypes FlashInfer's dequantize writes.
_FLASHINFER_OUT = (torch.bfloat16, torch.float16)


def load_flashinfer() -> ModuleType:
    """Import ``flashinfer``; raise :class:`BackendUnavailableError` with the fix when it is missing."""
    try:
        import flashinfer
    except ImportError as err:
        raise BackendUnavailableError(
            f"flashinfer is not importable ({err}); pip install flashinfer-python, or unset "
            "FP4KV_BACKEND / choose triton"
        ) from None
    return flashinfer


class FlashInferBackend(TritonBackend):
    """FlashInfer's ``nvfp4_kv_dequantize`` (SM80+) and ``nvfp4_kv_quantize`` (SM100+); Triton otherwise.

    Tensors as :class:`~fp4kv_cli.quant.backend.TorchBackend`: ``x [M, K]``, ``packed [M, K/2]``
    uint8, ``scales [M, K/16]`` uint8, buffers ``[slots, H, K/2]`` / ``[slots, H, K/16]``.
    """

    name = "flashinfer"

    def __init__(self) -> None:
        self.flashinfer = load_flashinfer()

    def quantize(
        self, fmt: str, x: torch.Tensor, global_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``nvfp4_kv_quantize`` for NVFP4 bf16/fp16 on SM100+, the Triton kernel otherwise."""
        if fmt == "nvfp4" and global_scale is not None and self._native_quantize(x):
            g = as_global_scale(global_scale, x.device).reshape(1)
            return self.flashinfer.nvfp4_kv_quantize(x.contiguous(), g)
        return super().quantize(fmt, x, global_scale)

    def dequantize(
        self,
        fmt: str,
        packed: torch.Tensor,
        scales: torch.Tensor,
        global_scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``nvfp4_kv_dequantize`` for NVFP4 to bf16/fp16 on CUDA, the Triton kernel otherwise."""
        if self._native_dequantize(fmt, packed, dtype) and global_scale is not None and packed.dim() == 2:
            g = as_global_scale(global_scale, packed.device).reshape(1)
            return self.flashinfer.nvfp4_kv_dequantize(
                packed.contiguous(), scales.view(torch.uint8).contiguous(), g, output_dtype=dtype
            )
        return super().dequantize(fmt, packed, scales, global_scale, dtype)

    def quantize_and_store(
        self,
        fmt: str,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor,
        loc: torch.Tensor,
        x: torch.Tensor,
        global_scale: torch.Tensor | None,
    ) -> None:
        """FlashInfer quantize + a scatter where it quantizes natively, else the fused Triton kernel."""
        if fmt == "nvfp4" and self._native_quantize(x):
            TorchBackend.quantize_and_store(self, fmt, data_buffer, scale_buffer, loc, x, global_scale)
        else:
            super().quantize_and_store(fmt, data_buffer, scale_buffer, loc, x, global_scale)

    def dequantize_gather(
        self,
        fmt: str,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor,
        loc: torch.Tensor | None,
        global_scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """A gather + FlashInfer dequantize for NVFP4 to bf16/fp16, else the fused Triton kernel."""
        if self._native_dequantize(fmt, data_buffer, dtype):
            return TorchBackend.dequantize_gather(
                self, fmt, data_buffer, scale_buffer, loc, global_scale, dtype
            )
        return super().dequantize_gather(fmt, data_buffer, scale_buffer, loc, global_scale, dtype)

    @staticmethod
    def _native_quantize(x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dtype in _FLASHINFER_OUT
            and x.shape[-1] % 16 == 0
            and torch.cuda.get_device_capability(x.device) >= (10, 0)
        )

    @staticmethod
    def _native_dequantize(fmt: str, packed: torch.Tensor, dtype: torch.dtype) -> bool:
        return read_layout(fmt) == "nvfp4" and packed.is_cuda and dtype in _FLASHINFER_OUT


__all__ = ["FlashInferBackend", "load_flashinfer"]
