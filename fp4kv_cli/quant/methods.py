"""KV cache quant methods (SGLang's strategy design): buffers, quantize-and-store, dequantize,
cell size and scale loading for one storage format each.

The pool owns the buffers these create; attention backends only reshape what they return.
No transformers import here, so serving code can reuse the core.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant import reference
from fp4kv_cli.quant.backend import get_backend, read_layout
from fp4kv_cli.quant.formats import E2M1_MAX, E4M3_MAX, FP4_BLOCK_SIZE
from fp4kv_cli.quant.scales import ScalesFile, load_scales_file, parse_scales, per_layer_amax

ScaleSource = str | os.PathLike[str] | Mapping[str, Any] | ScalesFile
Buffers = dict[str, list[torch.Tensor]]


@dataclass(frozen=True)
class LayerScales:
    """Per-layer K and V scales a method uses, as float32 tensors of shape ``[num_layers]``.

    For NVFP4 these are the global dequant scales ``g``; for FP8 the per-tensor scales ``s``.
    """

    k: torch.Tensor
    v: torch.Tensor


class KVCacheMethod(ABC):
    """One KV storage format: buffer layout, write path, read path, size and scales."""

    name: ClassVar[str]
    #: The layout its buffers hold, as every reader (dequantize, gather, decode-attention kernel)
    #: names it: the method's own name unless it only writes another format's layout differently.
    layout: ClassVar[str]
    #: Stored bits per cached element, block scales included.
    bits_per_element: ClassVar[float]
    #: Whether a per-layer K/V scale is needed (from calibration or computed dynamically).
    uses_tensor_scale: ClassVar[bool] = False

    @abstractmethod
    def create_buffers(
        self, size: int, head_num: int, head_dim: int, layer_num: int, device: torch.device | str
    ) -> Buffers:
        """Allocate ``layer_num`` K/V data (and scale) buffers of ``size`` token slots.

        Returns ``{"k_buffer": [...], "v_buffer": [...], "k_scale_buffer": [...],
        "v_scale_buffer": [...]}`` with one tensor per layer (scale lists empty where the
        format has no block scales).
        """

    def quantize_and_store(
        self,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        k_scale_buffer: torch.Tensor | None,
        v_scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: float | torch.Tensor | None = None,
        v_scale: float | torch.Tensor | None = None,
        k_offset: torch.Tensor | None = None,
    ) -> None:
        """Quantize ``cache_k``/``cache_v`` ``[N, heads, head_dim]`` into one layer's buffers at
        slots ``loc [N]`` (int64). ``k_scale``/``v_scale`` are that layer's per-tensor scales.

        ``k_offset`` (``[heads, head_dim]``, K centering) is subtracted from K in fp32 before
        quantization. Attention needs no correction on read: every score of a query shifts by
        the same ``q . k_offset``, which softmax cancels.
        """
        if k_offset is not None:
            cache_k = cache_k.to(torch.float32) - k_offset.to(device=cache_k.device, dtype=torch.float32)
        self.store(k_buffer, k_scale_buffer, loc, cache_k, k_scale)
        self.store(v_buffer, v_scale_buffer, loc, cache_v, v_scale)

    @abstractmethod
    def store(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
    ) -> None:
        """Quantize ``x [N, heads, head_dim]`` into ``data_buffer``/``scale_buffer`` at slots ``loc``."""

    @abstractmethod
    def dequantize(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor | None = None,
        global_scale: float | torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        """Read slots ``loc [N]`` (all if None) back as ``[N, heads, head_dim]`` of ``dtype``."""

    def store_and_read(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """:meth:`store` ``x`` at ``loc``, then return what :meth:`dequantize` of those slots gives
        (``[N, heads, head_dim]`` of ``dtype``, bit for bit). Formats override it to derive the
        values from the bytes they just computed instead of reading the buffers back."""
        self.store(data_buffer, scale_buffer, loc, x, scale)
        return self.dequantize(data_buffer, scale_buffer, loc, scale, dtype)

    def store_and_read_pair(
        self,
        buffers: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
        loc: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_scale: float | torch.Tensor | None,
        v_scale: float | torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`store_and_read` of a layer's K and V stored in this format (``buffers``: K data,
        K scales, V data, V scales); formats override it to quantize both in one pass."""
        k_data, k_scales, v_data, v_scales = buffers
        return (
            self.store_and_read(k_data, k_scales, loc, k, k_scale, dtype),
            self.store_and_read(v_data, v_scales, loc, v, v_scale, dtype),
        )

    @abstractmethod
    def compute_cell_size(self, head_num: int, head_dim: int, num_layers: int, kv_size: int = 2) -> int:
        """Bytes one token occupies over all layers, block scales included.

        ``kv_size`` is the number of cached tensors per layer (2: K and V).
        """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.layout = read_layout(cls.name)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise :class:`FP4KVError` if this format cannot store heads of ``head_dim`` (any
        ``head_dim`` is fine unless a format says otherwise)."""

    def scale_from_amax(self, amax: float | Sequence[float] | torch.Tensor) -> torch.Tensor | None:
        """The per-tensor scale this method uses for a tensor of ``amax``, as float32 of
        ``amax``'s shape (0-dim for a float), or None if the method uses no tensor scale.
        Methods with ``uses_tensor_scale`` must override it."""
        if self.uses_tensor_scale:
            raise NotImplementedError(
                f"{type(self).__name__} uses a tensor scale but defines no scale_from_amax"
            )
        return None

    def load_scales(self, source: ScaleSource) -> LayerScales | None:
        """Per-layer scales from a ``scales.json`` path, a scales dict or a parsed file."""
        if not self.uses_tensor_scale:
            return None
        k_amax, v_amax = per_layer_amax(source)
        return LayerScales(k=self.scale_from_amax(k_amax), v=self.scale_from_amax(v_amax))

    @staticmethod
    def load_k_offsets(source: ScaleSource) -> torch.Tensor | None:
        """Per-layer K centering offsets ``[num_layers, heads, head_dim]`` float32 from a scales
        file (None when it was calibrated without ``--center-k``)."""
        parsed = source if isinstance(source, ScalesFile) else _as_scales_file(source)
        offsets = [layer.k_offset for layer in parsed.layers]
        if all(o is None for o in offsets):
            return None
        if any(o is None for o in offsets):
            raise FP4KVError(
                "scales file has k_offset for some layers only; re-run fp4kv calibrate --center-k"
            )
        return torch.tensor(offsets, dtype=torch.float32)


def _as_scales_file(source: str | os.PathLike[str] | Mapping[str, Any]) -> ScalesFile:
    return parse_scales(source) if isinstance(source, Mapping) else load_scales_file(source)


class FP4KVCacheQuantMethod(KVCacheMethod):
    """Packed E2M1 data ``[size, heads, head_dim/2]`` uint8 + one scale byte per 16 elements
    ``[size, heads, head_dim/16]`` uint8."""

    SCALE_BLOCK_SIZE: ClassVar[int] = FP4_BLOCK_SIZE
    bits_per_element: ClassVar[float] = 4 + 8 / FP4_BLOCK_SIZE

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` unless ``head_dim`` is a multiple of the scale block."""
        if head_dim % self.SCALE_BLOCK_SIZE:
            raise FP4KVError(
                f"{self.name} needs head_dim divisible by {self.SCALE_BLOCK_SIZE}, got {head_dim}; "
                "use --kv-dtype fp8 or bf16 for this model"
            )

    def create_buffers(
        self, size: int, head_num: int, head_dim: int, layer_num: int, device: torch.device | str
    ) -> Buffers:
        self.check_head_dim(head_dim)

        def make(width: int) -> list[torch.Tensor]:
            return [
                torch.zeros(size, head_num, width, dtype=torch.uint8, device=device) for _ in range(layer_num)
            ]

        return {
            "k_buffer": make(head_dim // 2),
            "v_buffer": make(head_dim // 2),
            "k_scale_buffer": make(head_dim // self.SCALE_BLOCK_SIZE),
            "v_scale_buffer": make(head_dim // self.SCALE_BLOCK_SIZE),
        }

    def compute_cell_size(self, head_num: int, head_dim: int, num_layers: int, kv_size: int = 2) -> int:
        self.check_head_dim(head_dim)
        per_head = head_dim // 2 + head_dim // self.SCALE_BLOCK_SIZE
        return per_head * head_num * num_layers * kv_size

    def store(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
    ) -> None:
        get_backend(x.device).quantize_and_store(
            self.name, data_buffer, scale_buffer, loc, x, self._global(scale, x.device)
        )

    def store_and_read(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if dtype == torch.float8_e4m3fn:
            return super().store_and_read(data_buffer, scale_buffer, loc, x, scale, dtype)
        return get_backend(x.device).quantize_store_readback(
            self.name, data_buffer, scale_buffer, loc, x, self._global(scale, x.device), dtype
        )

    def store_and_read_pair(
        self,
        buffers: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
        loc: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_scale: float | torch.Tensor | None,
        v_scale: float | torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype == torch.float8_e4m3fn:
            return super().store_and_read_pair(buffers, loc, k, v, k_scale, v_scale, dtype)
        return get_backend(k.device).quantize_store_readback_pair(
            self.name,
            buffers,
            loc,
            k,
            v,
            self._global(k_scale, k.device),
            self._global(v_scale, k.device),
            dtype,
        )

    def dequantize(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor | None = None,
        global_scale: float | torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        fp8_scale: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`KVCacheMethod.dequantize`; ``dtype=torch.float8_e4m3fn`` re-encodes the values
        as E4M3 with per-tensor scale ``fp8_scale`` (NVFP4 default ``6 * g``, which cannot overflow)
        for FP8 attention paths."""
        backend = get_backend(data_buffer.device)
        g = self._global(global_scale, data_buffer.device)
        if dtype != torch.float8_e4m3fn:
            return backend.dequantize_gather(self.layout, data_buffer, scale_buffer, loc, g, dtype)
        if fp8_scale is None:
            if g is None:
                raise ValueError(f"{self.name} -> fp8 needs fp8_scale (the per-tensor FP8 scale)")
            fp8_scale = g * E2M1_MAX
        values = backend.dequantize_gather(self.layout, data_buffer, scale_buffer, loc, g, torch.float32)
        return reference.to_fp8_output(values, fp8_scale)

    def _global(self, scale: float | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        return None


class NVFP4KVMethod(FP4KVCacheQuantMethod):
    """Two-level NVFP4: FP32 per-layer global dequant scale ``g`` x FP8 E4M3 scale per 16.

    ``g`` (``k_scale``/``v_scale``) is ``amax / (6 * 448)`` of the calibrated K or V.
    """

    name: ClassVar[str] = "nvfp4"
    uses_tensor_scale: ClassVar[bool] = True

    def scale_from_amax(self, amax: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """``g = amax / (6 * 448)``."""
        return torch.as_tensor(amax, dtype=torch.float32) / (E2M1_MAX * E4M3_MAX)

    def _global(self, scale: float | torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if scale is None:
            raise ValueError("nvfp4 needs a per-layer global scale (k_scale / v_scale)")
        return reference.as_global_scale(scale, device)


class NVFP4Over6KVMethod(NVFP4KVMethod):
    """NVFP4 written "4 over 6" (vLLM's ``nvfp4_4over6``): per block the scale that maps the max to
    6 or to 4, whichever the writer's squared error prefers (ties keep 6; see
    :mod:`fp4kv_cli.quant.reference`). Same buffers, scales and readers as ``nvfp4`` (its
    ``layout``, from :func:`~fp4kv_cli.quant.backend.read_layout`)."""

    name: ClassVar[str] = "nvfp4_4over6"


class BlockFP4KVMethod(FP4KVCacheQuantMethod):
    """Single-level block FP4: a power-of-two UE8M0 scale per 16 elements, no global scale."""

    name: ClassVar[str] = "blockfp4"


class FP8KVMethod(KVCacheMethod):
    """Per-tensor FP8 E4M3 (``float8_e4m3fn``) with a per-layer scale ``s = amax / 448``."""

    name: ClassVar[str] = "fp8"
    bits_per_element: ClassVar[float] = 8.0
    uses_tensor_scale: ClassVar[bool] = True

    def create_buffers(
        self, size: int, head_num: int, head_dim: int, layer_num: int, device: torch.device | str
    ) -> Buffers:
        def make() -> list[torch.Tensor]:
            return [
                torch.zeros(size, head_num, head_dim, dtype=torch.float8_e4m3fn, device=device)
                for _ in range(layer_num)
            ]

        return {"k_buffer": make(), "v_buffer": make(), "k_scale_buffer": [], "v_scale_buffer": []}

    def compute_cell_size(self, head_num: int, head_dim: int, num_layers: int, kv_size: int = 2) -> int:
        return head_dim * head_num * num_layers * kv_size

    def scale_from_amax(self, amax: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """``s = amax / 448``."""
        return torch.as_tensor(amax, dtype=torch.float32) / E4M3_MAX

    def store(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
    ) -> None:
        if scale is None:
            raise ValueError("fp8 needs the layer's per-tensor scale (k_scale / v_scale)")
        data_buffer[loc] = reference.fp8_quantize_reference(x, scale)

    def store_and_read(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if scale is None:
            raise ValueError("fp8 needs the layer's per-tensor scale (k_scale / v_scale)")
        data = reference.fp8_quantize_reference(x, scale)
        data_buffer[loc] = data
        return reference.fp8_dequantize_reference(data, scale, dtype)

    def dequantize(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor | None = None,
        global_scale: float | torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        if global_scale is None:
            raise ValueError("fp8 needs the layer's per-tensor scale to dequantize")
        data = data_buffer if loc is None else data_buffer[loc]
        return reference.fp8_dequantize_reference(data, global_scale, dtype)


class BF16KVMethod(KVCacheMethod):
    """Unquantized storage in the model's 16-bit dtype: the baseline every format is compared to."""

    name: ClassVar[str] = "bf16"
    bits_per_element: ClassVar[float] = 16.0

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype

    def create_buffers(
        self, size: int, head_num: int, head_dim: int, layer_num: int, device: torch.device | str
    ) -> Buffers:
        def make() -> list[torch.Tensor]:
            return [
                torch.zeros(size, head_num, head_dim, dtype=self.dtype, device=device)
                for _ in range(layer_num)
            ]

        return {"k_buffer": make(), "v_buffer": make(), "k_scale_buffer": [], "v_scale_buffer": []}

    def compute_cell_size(self, head_num: int, head_dim: int, num_layers: int, kv_size: int = 2) -> int:
        return 2 * head_dim * head_num * num_layers * kv_size

    def store(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
    ) -> None:
        data_buffer[loc] = x.to(data_buffer.dtype)

    def store_and_read(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor,
        x: torch.Tensor,
        scale: float | torch.Tensor | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        data = x.to(data_buffer.dtype)
        data_buffer[loc] = data
        return data.to(dtype)

    def dequantize(
        self,
        data_buffer: torch.Tensor,
        scale_buffer: torch.Tensor | None,
        loc: torch.Tensor | None = None,
        global_scale: float | torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> torch.Tensor:
        data = data_buffer if loc is None else data_buffer[loc]
        return data.to(dtype)
