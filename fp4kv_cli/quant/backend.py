"""Which implementation runs the quant math: chosen here and nowhere else.

``FP4KV_BACKEND=torch|triton|flashinfer`` forces one; otherwise the fastest that supports the
tensor's device is used (Triton where CUDA is present, else the PyTorch reference). Every
backend produces the reference's bytes; kernels register themselves in :data:`BACKENDS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant import reference

#: Formats that store E2M1 codes with block scales (writer names) -> the layout their bytes are
#: in, as every reader names it (dequantize, gather, the decode-attention kernel, an exported
#: checkpoint): ``nvfp4_4over6`` is a store-time rule on the ``nvfp4`` layout.
FP4_LAYOUTS = {"nvfp4": "nvfp4", "nvfp4_4over6": "nvfp4", "blockfp4": "blockfp4"}
#: Writers of the two-level NVFP4 layout (E4M3 block scale x FP32 global scale ``g``).
NVFP4_WRITERS = tuple(fmt for fmt, layout in FP4_LAYOUTS.items() if layout == "nvfp4")


def read_layout(fmt: str) -> str:
    """The layout a reader decodes format ``fmt``'s bytes as (see :data:`FP4_LAYOUTS`; every other
    format is its own layout)."""
    return FP4_LAYOUTS.get(fmt, fmt)


class BackendUnavailableError(FP4KVError):
    """A forced backend cannot run on this machine or device."""


class TorchBackend:
    """The PyTorch reference. Runs on any device; defines the bytes every backend must match.

    Tensors: ``x [M, K]`` bf16/fp16/fp32; ``packed [M, K/2]`` uint8; ``scales [M, K/16]`` uint8;
    cache buffers ``[slots, heads, K/2]`` / ``[slots, heads, K/16]`` uint8; ``loc [N]`` int64 slots.
    """

    name = "torch"

    def supports(self, device: torch.device) -> bool:
        """Whether this backend runs on ``device``."""
        return True

    def quantize(
        self, fmt: str, x: torch.Tensor, global_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``x [M, K]`` to ``(packed [M, K/2], scales [M, K/16])`` in ``fmt``."""
        if fmt == "nvfp4":
            return reference.nvfp4_quantize_reference(x, _require(global_scale))
        if fmt == "nvfp4_4over6":
            return reference.nvfp4_4over6_quantize_reference(x, _require(global_scale))
        return reference.blockfp4_quantize_reference(x)

    def dequantize(
        self,
        fmt: str,
        packed: torch.Tensor,
        scales: torch.Tensor,
        global_scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Decode ``packed [M, K/2]`` + ``scales [M, K/16]`` to ``[M, K]`` of ``dtype`` (``fmt``'s
        bytes read as its :func:`read_layout`)."""
        if read_layout(fmt) == "nvfp4":
            return reference.nvfp4_dequantize_reference(packed, scales, _require(global_scale), dtype)
        return reference.blockfp4_dequantize_reference(packed, scales, dtype)

    def quantize_and_store(
        self,
        fmt: str,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor,
        loc: torch.Tensor,
        x: torch.Tensor,
        global_scale: torch.Tensor | None,
    ) -> None:
        """Quantize ``x [N, H, K]`` and write rows into buffer slots ``loc [N]``."""
        n, heads, dim = x.shape
        packed, scales = self.quantize(fmt, x.reshape(n * heads, dim), global_scale)
        data_buffer[loc] = packed.view(n, heads, dim // 2)
        scale_buffer[loc] = scales.view(n, heads, dim // 16)

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
        """:meth:`quantize_and_store`, then ``[N, H, K]`` of ``dtype``: what :meth:`dequantize_gather`
        of slots ``loc`` now gives, bit for bit, computed from the quantizer's own codes and block
        scales instead of reading the buffers back."""
        n, heads, dim = x.shape
        packed, scales, values = reference.fp4_quantize_readback(
            fmt, x.reshape(n * heads, dim), None if fmt == "blockfp4" else _require(global_scale), dtype
        )
        data_buffer[loc] = packed.view(n, heads, dim // 2)
        scale_buffer[loc] = scales.view(n, heads, dim // 16)
        return values.view(n, heads, dim)

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
        """:meth:`quantize_store_readback` of one layer's K and V ``[N, H, K]`` (``buffers``: K data,
        K scales, V data, V scales) in one quantizer pass over their rows, each row with its
        tensor's global scale: the same bytes and values as two calls, in half the small ops."""
        n, heads, dim = k.shape
        rows = n * heads
        x = torch.cat([k.reshape(rows, dim), v.reshape(rows, dim)])
        g = None
        if fmt != "blockfp4":
            g = torch.stack([_require(k_global), _require(v_global)]).repeat_interleave(rows).unsqueeze(-1)
        packed, scales, values = reference.fp4_quantize_readback(fmt, x, g, dtype)
        k_data, k_scales, v_data, v_scales = buffers
        k_data[loc] = packed[:rows].view(n, heads, dim // 2)
        v_data[loc] = packed[rows:].view(n, heads, dim // 2)
        k_scales[loc] = scales[:rows].view(n, heads, dim // 16)
        v_scales[loc] = scales[rows:].view(n, heads, dim // 16)
        return values[:rows].view(n, heads, dim), values[rows:].view(n, heads, dim)

    def dequantize_gather(
        self,
        fmt: str,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor,
        loc: torch.Tensor | None,
        global_scale: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """Decode buffer slots ``loc [N]`` (all slots if None) to ``[N, H, K]`` of ``dtype``."""
        data = data_buffer if loc is None else data_buffer[loc]
        scales = scale_buffer if loc is None else scale_buffer[loc]
        n, heads, half = data.shape
        out = self.dequantize(
            fmt, data.reshape(n * heads, half), scales.reshape(n * heads, -1), global_scale, dtype
        )
        return out.view(n, heads, half * 2)


def _require(global_scale: torch.Tensor | None) -> torch.Tensor:
    if global_scale is None:
        raise ValueError("nvfp4 needs a global scale g; pass k_scale/v_scale or load calibrated scales")
    return global_scale


#: Backend name -> factory; kernels modules add theirs. A factory raises
#: :class:`BackendUnavailableError` when its dependencies are missing.
BACKENDS: dict[str, Callable[[], TorchBackend]] = {"torch": TorchBackend}
#: Preference order when nothing is forced.
AUTO_ORDER: tuple[str, ...] = ("triton", "torch")

_instances: dict[str, TorchBackend] = {}


def _instance(name: str) -> TorchBackend:
    if name not in _instances:
        _register_kernels()
        if name not in BACKENDS:
            raise BackendUnavailableError(f"unknown FP4KV_BACKEND {name!r}; choose one of {sorted(BACKENDS)}")
        _instances[name] = BACKENDS[name]()
    return _instances[name]


def _register_kernels() -> None:
    """Import the kernel modules so they can add themselves to :data:`BACKENDS`."""
    try:
        import fp4kv_cli.quant.kernels  # noqa: F401  (registers on import)
    except ImportError:
        pass


def get_backend(device: torch.device | str) -> TorchBackend:
    """The backend for tensors on ``device``: ``FP4KV_BACKEND`` if set, else the best available.

    Memoised per (device, ``FP4KV_BACKEND``): the cache calls this on every store and read.
    """
    forced = os.environ.get("FP4KV_BACKEND", "").strip().lower()
    key = (str(device), forced)
    if key not in _chosen:
        _chosen[key] = _choose(torch.device(device), forced)
    return _chosen[key]


#: ``get_backend``'s choices by (device, forced backend name).
_chosen: dict[tuple[str, str], TorchBackend] = {}


def _choose(device: torch.device, forced: str) -> TorchBackend:
    if forced:
        backend = _instance(forced)
        if not backend.supports(device):
            raise BackendUnavailableError(
                f"FP4KV_BACKEND={forced} cannot run on {device}; unset it or choose torch"
            )
        return backend
    for name in AUTO_ORDER:
        try:
            backend = _instance(name)
        except BackendUnavailableError:
            continue
        if backend.supports(device):
            return backend
    return _instance("torch")
