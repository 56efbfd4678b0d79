"""GPU kernels behind the backend registry: importing this package registers them.

- ``triton``: :class:`~fp4kv_cli.quant.kernels.triton_fp4.TritonBackend`, every FP4 op on SM80+.
- ``flashinfer``: :class:`~fp4kv_cli.quant.kernels.flashinfer_backend.FlashInferBackend`, FlashInfer's
  NVFP4 KV kernels where they run (dequantize SM80+, quantize SM100+), Triton elsewhere. Its factory
  raises :class:`~fp4kv_cli.quant.backend.BackendUnavailableError` when flashinfer is not installed.

``fp4kv_cli.quant.backend`` imports this package lazily; without Triton the import fails and the
PyTorch reference stays the only backend.
"""

from fp4kv_cli.quant.backend import BACKENDS
from fp4kv_cli.quant.kernels.flashinfer_backend import FlashInferBackend
from fp4kv_cli.quant.kernels.triton_fp4 import TritonBackend

BACKENDS["triton"] = TritonBackend
BACKENDS["flashinfer"] = FlashInferBackend

__all__ = ["FlashInferBackend", "TritonBackend"]
