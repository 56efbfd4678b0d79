"""transformers ``Cache`` layers whose K/V really live in a quant method's buffers.

One :class:`QuantKVLayer` per attention layer owns that layer's buffers (created by the
methods, laid out ``[batch * capacity, heads, ...]``, slot ``b * capacity + t``). Every token,
prompt and generated, is written through ``method.store`` (K with the layer's K method, V with
its V method); attention gets the values back through each method's ``dequantize`` of the
filled slots, as a kernel reading the FP4 buffers would. The methods own the math, the layer
owns the buffers, the backend only runs ops.

A token's stored bytes never change once written, so each stored token is dequantized once, into
the layer's :class:`ReadBuffer` (``[batch, heads, capacity, head_dim]`` of the compute dtype),
and reads are views of it: a decode step costs one token's dequantize, not the whole prefix's,
and gives exactly the values re-dequantizing the buffers gives. Whatever changes the meaning of
stored bytes (a new dynamic scale, crop, reset) or moves them (capacity growth, row selection)
updates the read buffer with them. Layers (and K vs V) may use different formats:
see :meth:`QuantKVCache.from_storage`.

Read semantics follow serving engines: a multi-token forward (prefill, or a chunk of a
teacher-forced text) attends to the stored prefix read back from the buffers plus its own
fresh K/V, as a prefill kernel does; a single-token decode step reads everything, its own
token included, from the buffers.

Per-layer scales (the NVFP4 global scale ``g``, the FP8 per-tensor scale) come from a
calibrated scales file, or dynamically from the amax of the prefill's real tokens (the
attention mask given to :meth:`QuantKVCache.set_token_mask` keeps padding out). An optional
per-layer ``k_offset`` ``[heads, head_dim]`` is subtracted from K before it is stored (K
centering); reads need no correction since softmax cancels the shift ``q . k_offset``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.methods import KVCacheMethod, LayerScales
from fp4kv_cli.quant.rotation import QKRotation, hadamard_matrix
from fp4kv_cli.quant.storage import KVStorage

#: Capacity grows (and is rounded up) in chunks of this many tokens per batch row.
CAPACITY_CHUNK = 256
#: Layer types whose K/V this cache can hold; sliding-window layers are stored in full.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
#: Slot tensors :class:`_SharedState` keeps (oldest dropped first).
SLOT_MEMO = 4


@dataclass
class _SharedState:
    """State every layer of one cache shares: the prefill token mask and slot indices.

    The slot tensors are memoised by shape so that a decode step computes its slots once (in the
    first layer) instead of once per layer; a few are kept, so that a prefill chunk's write and
    its read of the previous chunk (which alternate layer by layer) do not evict each other.
    """

    token_mask: torch.Tensor | None = None
    #: During a static decode (:meth:`QuantKVCache.begin_static_decode`): ``[batch]`` int64
    #: device tensor, the slot each row writes this step (``row * capacity + position``); its
    #: owner advances it between steps.
    static_slots: torch.Tensor | None = None
    _slots: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)

    def write_loc(
        self, batch: int, capacity: int, start: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """Slots ``[batch * length]`` int64 of positions ``start .. start+length-1`` of every row, row-major."""
        key = (batch, capacity, start, length, device)
        slots = self._slots.get(key)
        if slots is None:
            if len(self._slots) >= SLOT_MEMO:
                del self._slots[next(iter(self._slots))]  # the oldest
            rows = torch.arange(batch, device=device).unsqueeze(1) * capacity
            slots = self._slots[key] = (rows + torch.arange(start, start + length, device=device)).reshape(-1)
        return slots


@dataclass
class _ErrorStats:
    """Running sums for the relative reconstruction error of stored K and V (device tensors)."""

    k_err: torch.Tensor
    k_ref: torch.Tensor
    v_err: torch.Tensor
    v_ref: torch.Tensor


class ReadBuffer:
    """Dequantized K and V ``[batch, heads, capacity, head_dim]`` of one layer, in the compute dtype.

    Positions ``< filled`` of every row hold exactly what the layer's ``dequantize`` of the
    stored bytes at those slots gives; later positions are scratch (a multi-token forward puts
    its fresh K/V there to attend without a concatenation). Generic over what a read is: the
    owner passes the dequantized values in; the buffer only keeps them and says what is valid.
    """

    def __init__(
        self, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.filled = 0

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put ``k``/``v`` ``[batch, heads, n, head_dim]`` at positions ``start .. start+n-1``."""
        end = start + k.shape[-2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v

    def view(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions ``0 .. length-1``, ``[batch, heads, length, head_dim]`` views."""
        return self.k[:, :, :length], self.v[:, :, :length]

    def invalidate_from(self, position: int) -> None:
        """Positions from ``position`` on no longer hold stored tokens' values."""
        self.filled = min(self.filled, position)

    def grown(self, capacity: int) -> ReadBuffer:
        """A buffer of ``capacity`` positions holding this one's filled positions."""
        batch, heads, _, head_dim = self.k.shape
        out = ReadBuffer(batch, heads, capacity, head_dim, self.k.dtype, self.k.device)
        out.write(0, *self.view(self.filled))
        out.filled = self.filled
        return out

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` (in that order, repeats allowed)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


@dataclass
class _Buffers:
    """One layer's storage: K/V data ``[batch * capacity, heads, ...]`` and block scales (or None)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> _Buffers:
        return _Buffers(
            fn(self.k),
            fn(self.v),
            None if self.k_scale is None else fn(self.k_scale),
            None if self.v_scale is None else fn(self.v_scale),
        )


class QuantKVLayer(CacheLayerMixin):
    """One attention layer's K/V stored through a :class:`KVCacheMethod`.

    Parameters
    ----------
    method:
        The storage format (``bf16``, ``fp8``, ``nvfp4``, ``blockfp4`` ...) of K, and of V
        unless ``v_method`` is given.
    shared:
        State shared with the other layers of the cache (token mask, slot indices).
    k_scale, v_scale:
        This layer's per-tensor K / V scales (0-dim float32) for methods that use one; None
        means dynamic (amax of the prefill's real tokens), per tensor.
    k_offset:
        ``[heads, head_dim]`` float32 subtracted from K before storing, or None.
    capacity_hint:
        Tokens per batch row to allocate up front (prompt + new tokens); grows by
        :data:`CAPACITY_CHUNK` when exceeded.
    v_method:
        The storage format of V (default: ``method``).
    rotation:
        Q/K rotation of the stored K (after centering), or None: the buffers hold
        ``rotation.apply(K - k_offset)``; the gather read rotates K back (``H`` is its own
        inverse), the fused read rotates the query instead (:mod:`fp4kv_cli.fused_attention`).
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        method: KVCacheMethod,
        shared: _SharedState,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        k_offset: torch.Tensor | None = None,
        capacity_hint: int | None = None,
        v_method: KVCacheMethod | None = None,
        rotation: QKRotation | None = None,
    ) -> None:
        super().__init__()
        self.rotation = rotation
        self.k_method = method
        self.v_method = method if v_method is None else v_method
        #: K and V stored alike (one method, or two of one parameterless type): one call writes both.
        self._same_format = self.v_method is self.k_method or (
            type(self.v_method) is type(self.k_method) and not vars(self.k_method) and not vars(self.v_method)
        )
        self.shared = shared
        self.dynamic_k = self.k_method.uses_tensor_scale and k_scale is None
        self.dynamic_v = self.v_method.uses_tensor_scale and v_scale is None
        self.k_scale = k_scale
        self.v_scale = v_scale
        self.k_offset = k_offset
        self.capacity_hint = capacity_hint
        self.buffers: _Buffers | None = None
        #: Stored tokens dequantized once (see :class:`ReadBuffer`); None until the first read.
        self.read_buffer: ReadBuffer | None = None
        self.batch = 0
        self.capacity = 0
        self.length = 0
        self.track_error = False
        self.error_stats: _ErrorStats | None = None
        #: Set by :meth:`QuantKVCache.set_fused_decode`: on a decode step of a layer it accepts,
        #: ``update`` skips the read and sets ``kernel_step``, telling the attention function to
        #: attend from the buffers itself (it clears the flag and counts ``kernel_reads``).
        self.fuse_if: Callable[[QuantKVLayer], bool] | None = None
        self._fusable: bool | None = None  # fuse_if's verdict, once the buffers exist
        self.kernel_step = False
        self.kernel_reads = 0

    # ----------------------------------------------------------------- transformers API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate buffers for ``key_states [batch, heads, T, head_dim]``."""
        self.batch, self.heads, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.capacity = _round_up(max(self.capacity_hint or 0, key_states.shape[-2], 1), CAPACITY_CHUNK)
        self.buffers = self._allocate(self.capacity)
        if self.k_offset is not None:
            self.k_offset = self.k_offset.to(device=self.device, dtype=torch.float32)
        if self.rotation is not None:
            self.rotation.check_head_dim(self.head_dim)
            hadamard_matrix(self.rotation.block, self.device)  # made here, not inside a graph capture
        if self.k_scale is not None:
            self.k_scale = self.k_scale.to(self.device)
        if self.v_scale is not None:
            self.v_scale = self.v_scale.to(self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states``/``value_states`` ``[batch, heads, T, head_dim]`` and return the
        layer's K and V ``[batch, heads, length, head_dim]`` for attention (on a decode step the
        attention kernel reads itself, see :meth:`QuantKVCache.set_fused_decode`, the inputs are
        returned as they came, unused)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = key_states if self.k_offset is None else key_states.float() - self.k_offset[:, None, :]
        stored = keys if self.rotation is None else self.rotation.apply(keys)
        start, new = self.length, key_states.shape[-2]
        if self.static and new == 1:
            # Static decode: the slots come from a device tensor and nothing on the host changes,
            # so a captured step replays correctly; the attention kernel reads the buffers.
            self._store(self.shared.static_slots, stored, value_states, key_states)
            self.kernel_step = True
            return key_states, value_states
        if start == 0 and (self.dynamic_k or self.dynamic_v):
            self._set_dynamic_scales(stored, value_states)
        self._ensure_capacity(start + new)
        write = self.shared.write_loc(self.batch, self.capacity, start, new, self.device)
        if new == 1:
            if self._fusable is None:  # formats, dtype and device are fixed from here on
                self._fusable = self.fuse_if is not None and self.fuse_if(self)
            self.kernel_step = self._fusable
            if self.kernel_step:  # the attention kernel reads the buffers (fp4kv_cli.fused_attention)
                self._store(write, stored, value_states, key_states)
                self.length = start + new
                return key_states, value_states
            return self._decode_step(write, stored, value_states, key_states)
        self._store(write, stored, value_states, key_states)
        self.length = start + new
        fresh_k = keys.to(self.dtype)
        if start == 0:
            return fresh_k, value_states
        self._read(start)
        self.read_buffer.write(start, fresh_k, value_states)  # scratch: past the filled positions
        return self.read_buffer.view(start + new)

    @property
    def static(self) -> bool:
        """Whether a static decode is running (see :meth:`QuantKVCache.begin_static_decode`)."""
        return self.shared.static_slots is not None

    @property
    def read_length(self) -> int:
        """Slots per row a decode step's attention covers: the filled ones, or the whole capacity
        during a static decode (its mask then admits the filled ones)."""
        return self.capacity if self.static else self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the mask for ``query_length`` new tokens."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens stored per batch row (left padding included)."""
        return self.length

    def get_max_length(self) -> int:
        """-1: the layer grows without a fixed maximum."""
        return -1

    def get_max_cache_shape(self) -> int:
        """Alias of :meth:`get_max_length` that transformers < 5.16 callers use."""
        return self.get_max_length()

    def reset(self) -> None:
        """Drop the stored tokens (and dynamic scales); buffers are reallocated on the next update."""
        self.buffers = None
        self.read_buffer = None
        self.length = self.capacity = self.batch = 0
        self.is_initialized = False
        self._fusable = None
        if self.dynamic_k:
            self.k_scale = None
        if self.dynamic_v:
            self.v_scale = None

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (their slots are overwritten later)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)
        if self.read_buffer is not None:
            self.read_buffer.invalidate_from(self.length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder batch rows for beam search."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only batch rows ``indices``."""
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times."""
        if self.is_initialized:
            self._select_rows(torch.arange(self.batch, device=self.device).repeat_interleave(repeats))

    # ----------------------------------------------------------------- accounting
    def bytes_per_token(self) -> int:
        """Bytes one token of one batch row occupies in this layer (K, V and their scales)."""
        if self.buffers is None:
            return 0
        slots = self.batch * self.capacity
        return sum(t.numel() * t.element_size() for t in self.buffers.tensors()) // slots

    def capacity_bytes(self) -> int:
        """Bytes of the buffers this layer holds."""
        if self.buffers is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.buffers.tensors())

    # ----------------------------------------------------------------- internals
    def _allocate(self, capacity: int) -> _Buffers:
        """K buffers from the K method, V buffers from the V method (one call when they are the
        same method; otherwise the unused half of each call is dropped at once)."""
        size = self.batch * capacity
        k_made = self.k_method.create_buffers(size, self.heads, self.head_dim, 1, self.device)
        v_made = (
            k_made
            if self.v_method is self.k_method
            else self.v_method.create_buffers(size, self.heads, self.head_dim, 1, self.device)
        )
        return _Buffers(
            k_made["k_buffer"][0],
            v_made["v_buffer"][0],
            k_made["k_scale_buffer"][0] if k_made["k_scale_buffer"] else None,
            v_made["v_scale_buffer"][0] if v_made["v_scale_buffer"] else None,
        )

    def _store(
        self, write: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, original_k: torch.Tensor
    ) -> None:
        """Write ``keys`` (already centered and rotated) and ``values`` ``[batch, heads, T, dim]`` at
        slots ``write``."""
        flat_k, flat_v = _to_rows(keys), _to_rows(values)
        b = self.buffers
        self.k_method.store(b.k, b.k_scale, write, flat_k, self.k_scale)
        self.v_method.store(b.v, b.v_scale, write, flat_v, self.v_scale)
        if self.track_error:
            self._track_error(write, flat_k, flat_v, original_k)

    def _decode_step(
        self, write: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, original_k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per row (``[batch, heads, 1, dim]``, K centered and rotated) at slots
        ``write`` and return the layer's K and V for a gather-read decode step: the read buffer
        gets the token's values from the store itself (:meth:`KVCacheMethod.store_and_read`, the
        values a dequantize of its bytes gives), not from reading the buffers back."""
        start = self.length
        flat_k, flat_v = _to_rows(keys), _to_rows(values)
        b = self.buffers
        if self.rotation is None and self._same_format:  # K and V in one pass
            k, v = self.k_method.store_and_read_pair(
                (b.k, b.k_scale, b.v, b.v_scale),
                write,
                flat_k,
                flat_v,
                self.k_scale,
                self.v_scale,
                self.dtype,
            )
        else:
            k_dtype = self.dtype if self.rotation is None else torch.float32
            k = self.k_method.store_and_read(b.k, b.k_scale, write, flat_k, self.k_scale, k_dtype)
            v = self.v_method.store_and_read(b.v, b.v_scale, write, flat_v, self.v_scale, self.dtype)
            if self.rotation is not None:  # back to the basis of the unrotated query, rounded once
                k = self.rotation.apply(k).to(self.dtype)
        if self.track_error:
            self._track_error(write, flat_k, flat_v, original_k)
        self.length = start + 1
        self._read(start)  # the stored tokens before this one, dequantized where not yet
        rb = self.read_buffer
        rb.write(start, _from_rows(k, self.batch), _from_rows(v, self.batch))
        rb.filled = self.length
        return rb.view(self.length)

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        old, old_capacity = self.buffers, self.capacity
        self.capacity = _round_up(needed, CAPACITY_CHUNK)
        self.buffers = self._allocate(self.capacity)
        for dst, src in zip(self.buffers.tensors(), old.tensors()):
            dst.view(self.batch, self.capacity, *dst.shape[1:])[:, :old_capacity] = src.view(
                self.batch, old_capacity, *src.shape[1:]
            )
        if self.read_buffer is not None:
            self.read_buffer = self.read_buffer.grown(self.capacity)

    def _read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[batch, heads, length, head_dim]`` of the first ``length`` stored tokens:
        views of the read buffer, after dequantizing the stored tokens it does not hold yet."""
        if self.read_buffer is None:
            self.read_buffer = ReadBuffer(
                self.batch, self.heads, self.capacity, self.head_dim, self.dtype, self.device
            )
        rb = self.read_buffer
        if rb.filled < length:
            k, v = self._dequantize(rb.filled, length - rb.filled)
            rb.write(rb.filled, k, v)
            rb.filled = length
        return rb.view(length)

    def _dequantize(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[batch, heads, count, head_dim]`` (compute dtype) of positions
        ``start .. start+count-1`` of every row, dequantized from the stored bytes."""
        loc = self.shared.write_loc(self.batch, self.capacity, start, count, self.device)
        b = self.buffers
        if self.rotation is None:
            k = self.k_method.dequantize(b.k, b.k_scale, loc, self.k_scale, self.dtype)
        else:  # back to the basis of the unrotated query, in fp32, rounded once
            k = self.k_method.dequantize(b.k, b.k_scale, loc, self.k_scale, torch.float32)
            k = self.rotation.apply(k).to(self.dtype)
        v = self.v_method.dequantize(b.v, b.v_scale, loc, self.v_scale, self.dtype)
        return _from_rows(k, self.batch), _from_rows(v, self.batch)

    def _set_dynamic_scales(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Per-tensor scales of the dynamic tensors (only those) from the amax of the real
        (unmasked) prefill tokens; no host sync. Tokens dequantized with the old scales are dropped
        from the read buffer."""
        if self.read_buffer is not None:
            self.read_buffer.invalidate_from(0)
        if self.dynamic_k:  # scale per unit amax (host floats)
            k_unit = float(self.k_method.scale_from_amax(1.0))
            self.k_scale = (self._real_amax(keys) * k_unit).clamp(min=torch.finfo(torch.float32).tiny)
        if self.dynamic_v:
            v_unit = float(self.v_method.scale_from_amax(1.0))
            self.v_scale = (self._real_amax(values) * v_unit).clamp(min=torch.finfo(torch.float32).tiny)

    def _real_amax(self, x: torch.Tensor) -> torch.Tensor:
        """Amax (0-dim float32, at least the smallest normal) of ``x [batch, heads, T, dim]`` over
        the tokens the shared token mask marks real."""
        mask = self.shared.token_mask
        magnitude = x.detach().abs().float()
        if mask is not None:
            if mask.shape != (x.shape[0], x.shape[-2]):
                raise ValueError(
                    f"token mask {tuple(mask.shape)} does not match the prefill [batch, tokens] "
                    f"{(x.shape[0], x.shape[-2])}"
                )
            real = mask.to(device=x.device, dtype=torch.bool)[:, None, :, None]
            magnitude = torch.where(real, magnitude, torch.zeros((), device=x.device))
        return magnitude.amax().clamp(min=torch.finfo(torch.float32).tiny)

    def _track_error(
        self, write: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor, original_k: torch.Tensor
    ) -> None:
        if self.error_stats is None:
            zero = torch.zeros((), dtype=torch.float32, device=self.device)
            self.error_stats = _ErrorStats(zero.clone(), zero.clone(), zero.clone(), zero.clone())
        b, stats = self.buffers, self.error_stats
        k_back = self.k_method.dequantize(b.k, b.k_scale, write, self.k_scale, torch.float32)
        v_back = self.v_method.dequantize(b.v, b.v_scale, write, self.v_scale, torch.float32)
        stats.k_err += (k_back - flat_k.float()).square().sum()
        stats.k_ref += original_k.float().square().sum()
        stats.v_err += (v_back - flat_v.float()).square().sum()
        stats.v_ref += flat_v.float().square().sum()

    def _select_rows(self, rows: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        rows = rows.to(self.device)
        capacity = self.capacity

        def pick(t: torch.Tensor) -> torch.Tensor:
            view = t.view(self.batch, capacity, *t.shape[1:])
            return view.index_select(0, rows).reshape(-1, *t.shape[1:])

        self.buffers = self.buffers.map(pick)
        if self.read_buffer is not None:
            self.read_buffer.select_rows(rows)
        self.batch = rows.numel()


class QuantKVCache(Cache):
    """A transformers ``Cache`` of :class:`QuantKVLayer` s, one per decoder layer.

    Every cache is built from a :class:`~fp4kv_cli.quant.storage.KVStorage` (each layer's K and V
    formats, scales, K offset and rotation; :meth:`from_storage`). The constructor and
    :meth:`for_model` are shorthands for one format on every layer.

    Parameters
    ----------
    method:
        The storage format every layer uses.
    num_layers:
        Decoder layers of the model.
    scales:
        Calibrated per-layer scales (``[num_layers]`` tensors) for methods that use them; None
        for dynamic scales (or methods without a tensor scale).
    k_offsets:
        ``[num_layers, heads, head_dim]`` K centering offsets, or None.
    capacity_hint:
        Tokens per batch row to allocate up front (e.g. longest prompt + max new tokens).
    rotation:
        Q/K rotation of every layer's stored K (after centering), or None.
    """

    def __init__(
        self,
        method: KVCacheMethod,
        num_layers: int,
        scales: LayerScales | None = None,
        k_offsets: torch.Tensor | None = None,
        capacity_hint: int | None = None,
        rotation: QKRotation | None = None,
    ) -> None:
        storage = KVStorage.uniform(method, num_layers, k_offsets=k_offsets, rotation=rotation)
        self._build_layers(storage if scales is None else storage.with_scales(scales), capacity_hint)

    @classmethod
    def for_model(
        cls,
        config: Any,
        method: KVCacheMethod,
        scales: LayerScales | None = None,
        k_offsets: torch.Tensor | None = None,
        capacity_hint: int | None = None,
        rotation: QKRotation | None = None,
    ) -> QuantKVCache:
        """A cache sized for a transformers model ``config`` (its decoder text config)."""
        return cls(method, _num_layers(config), scales, k_offsets, capacity_hint, rotation)

    @classmethod
    def from_storage(cls, config: Any, storage: KVStorage, capacity_hint: int | None = None) -> QuantKVCache:
        """A cache for a transformers model ``config`` storing each layer as ``storage`` says."""
        num_layers = _num_layers(config)
        if storage.num_layers != num_layers:
            raise FP4KVError(
                f"the KV storage has {storage.num_layers} layers but the model has {num_layers}; "
                "give one per layer (fp4kv analyze --write-recipe writes a matching file)"
            )
        cache = cls.__new__(cls)
        cache._build_layers(storage, capacity_hint)
        return cache

    def _build_layers(self, storage: KVStorage, capacity_hint: int | None) -> None:
        """One :class:`QuantKVLayer` per layer of ``storage``."""
        self.shared = _SharedState()
        #: How the last static decode ran (``graph`` / ``static``), None if there was none.
        self.static_decode: str | None = None
        #: What this cache stores, layer by layer.
        self.storage = storage
        layers = [
            QuantKVLayer(
                layer.k_method,
                self.shared,
                k_scale=layer.k_scale,
                v_scale=layer.v_scale,
                k_offset=layer.k_offset,
                capacity_hint=capacity_hint,
                v_method=layer.v_method,
                rotation=layer.rotation,
            )
            for layer in storage.layers
        ]
        Cache.__init__(self, layers=layers)

    def set_fused_decode(self, predicate: Callable[[QuantKVLayer], bool] | None) -> None:
        """From now on, a decode step of a layer for which ``predicate(layer)`` holds stores its
        token and skips reading the stored K/V back: the attention function reads the buffers
        itself (see :func:`fp4kv_cli.fused_attention.fused_decode`). None restores the gather
        read. Setting a predicate restarts each layer's ``kernel_reads`` count."""
        if predicate is not None:
            self.static_decode = None
        for layer in self.layers:
            layer.fuse_if = predicate
            layer._fusable = None
            layer.kernel_step = False
            if predicate is not None:
                layer.kernel_reads = 0

    def begin_static_decode(self, slots: torch.Tensor) -> None:
        """Decode steps from now on write every row's token at ``slots`` (``[batch]`` int64 device
        tensor, ``row * capacity + position``, advanced in place by the caller between steps),
        and leave reading to the attention kernel over the whole
        capacity, with no host-side state change per step: what a CUDA graph of the step needs
        (:mod:`fp4kv_cli.evaluate.static_decode`). The buffers must already hold the prompt and
        have room for every position the caller will write. The read buffers (dequantized copies
        the chunked prefill read from) are dropped: the kernel reads the stored bytes, and a later
        gather read rebuilds them."""
        self.shared.static_slots = slots
        for layer in self.layers:
            layer.read_buffer = None

    def end_static_decode(self, length: int, replayed: bool) -> None:
        """Back to ordinary steps, with ``length`` tokens per row now stored; ``replayed``: the
        steps ran as CUDA graph replays (recorded in :attr:`static_decode`)."""
        self.shared.static_slots = None
        self.static_decode = "graph" if replayed else "static"
        for layer in self.layers:
            layer.length = length

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """The prefill's attention mask ``[batch, tokens]`` (1 = real token) for dynamic scales."""
        self.shared.token_mask = mask

    def track_errors(self) -> None:
        """Accumulate the relative K/V reconstruction error of every stored token from now on."""
        for layer in self.layers:
            layer.track_error = True

    def error_sums(self) -> torch.Tensor:
        """Per-layer ``[num_layers, 4]`` float32 sums ``(||deq(q(K)) - K||^2, ||K||^2, same for V)``
        over the tokens stored since :meth:`track_errors`."""
        rows = []
        for layer in self.layers:
            stats = layer.error_stats
            if stats is None:
                raise ValueError("call track_errors() before storing tokens to measure reconstruction errors")
            rows.append(torch.stack([stats.k_err, stats.k_ref, stats.v_err, stats.v_ref]).cpu())
        return torch.stack(rows)

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence occupies over all layers (K, V and scales)."""
        return sum(layer.bytes_per_token() for layer in self.layers)

    def stored_bytes(self) -> int:
        """Bytes of the token slots written so far (every batch row, left padding included)."""
        return sum(layer.bytes_per_token() * layer.batch * layer.length for layer in self.layers)

    def capacity_bytes(self) -> int:
        """Bytes of all buffers the cache holds (written or not)."""
        return sum(layer.capacity_bytes() for layer in self.layers)

    def layer_scales(self) -> tuple[list[float], list[float]] | None:
        """Per-layer K and V scales in use (nan where a format has none; None when no layer's
        format uses a tensor scale)."""
        if not any(
            layer.k_method.uses_tensor_scale or layer.v_method.uses_tensor_scale for layer in self.layers
        ):
            return None
        return _floats([layer.k_scale for layer in self.layers]), _floats(
            [layer.v_scale for layer in self.layers]
        )


def _num_layers(config: Any) -> int:
    """Decoder layers of a transformers ``config``; raises for layer types the cache cannot hold."""
    text_config = config.get_text_config(decoder=True)
    layer_types = (
        getattr(text_config, "layer_types", None) or ["full_attention"] * text_config.num_hidden_layers
    )
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise FP4KVError(
            f"model has {', '.join(unsupported)} layers; the quantized KV cache supports only "
            f"{', '.join(SUPPORTED_LAYER_TYPES)} attention models"
        )
    return len(layer_types)


def _floats(values: Sequence[torch.Tensor | None]) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, T, dim]`` to rows ``[batch * T, heads, dim]`` (row-major over batch, T)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def _from_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Rows ``[batch * L, heads, dim]`` back to ``[batch, heads, L, dim]``."""
    rows, heads, dim = x.shape
    return x.view(batch, rows // batch, heads, dim).transpose(1, 2)
