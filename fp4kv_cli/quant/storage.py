"""How each layer's K and V are stored: format of K and of V, their per-tensor scales, the K
centering offset and the Q/K rotation, in one description built once (from a scales file where
there is one) and handed to the cache, so eval, analyze, bench and export read the same thing.

Free of transformers imports: the cache (:meth:`fp4kv_cli.cache.QuantKVCache.from_storage`) turns
a :class:`KVStorage` into layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.methods import BF16KVMethod, KVCacheMethod, LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method
from fp4kv_cli.quant.rotation import QKRotation
from fp4kv_cli.quant.scales import ScalesFile

#: The unquantized reference format; it stores K as the model wrote it (no offset, no rotation).
REFERENCE = "bf16"


@dataclass(frozen=True)
class LayerStorage:
    """One layer: the K and V methods, their 0-dim float32 scales (None: dynamic, or a method
    without one), the ``[kv_heads, head_dim]`` float32 K offset subtracted before storing (or
    None) and the rotation applied to K after that (and to the query that reads it), or None."""

    k_method: KVCacheMethod
    v_method: KVCacheMethod
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    k_offset: torch.Tensor | None = None
    rotation: QKRotation | None = None


@dataclass(frozen=True)
class KVStorage:
    """Every layer's :class:`LayerStorage`, in layer order."""

    layers: tuple[LayerStorage, ...]

    @property
    def num_layers(self) -> int:
        """Layers described."""
        return len(self.layers)

    def to(self, device: torch.device | str) -> KVStorage:
        """The same storage with its scale and offset tensors on ``device`` (moved once here,
        not per cache)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return KVStorage(
            tuple(
                replace(
                    layer,
                    k_scale=move(layer.k_scale),
                    v_scale=move(layer.v_scale),
                    k_offset=move(layer.k_offset),
                )
                for layer in self.layers
            )
        )

    @classmethod
    def build(
        cls,
        k_methods: Sequence[KVCacheMethod],
        v_methods: Sequence[KVCacheMethod],
        k_amax: Sequence[float] | None = None,
        v_amax: Sequence[float] | None = None,
        k_offsets: torch.Tensor | None = None,
        rotation: QKRotation | None = None,
    ) -> KVStorage:
        """Per-layer methods, each layer's scales from its own K / V method's ``scale_from_amax``
        of that layer's amax (all dynamic when no amax is given), ``k_offsets[i]`` (None: no
        centering) and one ``rotation`` for every layer whose K is quantized (a bf16 K stays as the
        model wrote it: rotating it would only add rounding)."""
        count = len(k_methods)
        for what, values in (("V formats", v_methods), ("K amax", k_amax), ("V amax", v_amax)):
            if values is not None and len(values) != count:
                raise FP4KVError(
                    f"storage has {count} layers but {len(values)} {what}; give one per layer "
                    "(calibrate this model with fp4kv calibrate)"
                )
        if k_offsets is not None and len(k_offsets) != count:
            raise FP4KVError(
                f"k_offset covers {len(k_offsets)} layers but the model has {count}; "
                "calibrate this model with fp4kv calibrate --center-k"
            )
        layers = []
        for i, (k_method, v_method) in enumerate(zip(k_methods, v_methods)):
            dynamic = k_amax is None or v_amax is None
            layers.append(
                LayerStorage(
                    k_method,
                    v_method,
                    None if dynamic else k_method.scale_from_amax(k_amax[i]),
                    None if dynamic else v_method.scale_from_amax(v_amax[i]),
                    None if k_offsets is None else k_offsets[i],
                    None if isinstance(k_method, BF16KVMethod) else rotation,
                )
            )
        return cls(tuple(layers))

    def with_scales(self, scales: LayerScales) -> KVStorage:
        """The same storage with layer ``i``'s K and V scales ``scales.k[i]`` and ``scales.v[i]``
        (calibrated scales given as scales, not amax); :class:`FP4KVError` unless they cover
        every layer."""
        if len(scales.k) != self.num_layers or len(scales.v) != self.num_layers:
            raise FP4KVError(
                f"scales cover {len(scales.k)} layers but the model has {self.num_layers}; "
                "calibrate this model with fp4kv calibrate"
            )
        return KVStorage(
            tuple(
                replace(layer, k_scale=scales.k[i], v_scale=scales.v[i])
                for i, layer in enumerate(self.layers)
            )
        )

    @classmethod
    def uniform(
        cls,
        method: KVCacheMethod,
        num_layers: int,
        k_amax: Sequence[float] | None = None,
        v_amax: Sequence[float] | None = None,
        k_offsets: torch.Tensor | None = None,
        rotation: QKRotation | None = None,
    ) -> KVStorage:
        """Every layer in ``method`` (K and V), as :meth:`build`."""
        return cls.build([method] * num_layers, [method] * num_layers, k_amax, v_amax, k_offsets, rotation)

    @classmethod
    def from_scales(
        cls,
        kv: str,
        num_layers: int,
        scales_file: ScalesFile | None,
        k_offsets: torch.Tensor | None,
        method_of: Callable[[str], KVCacheMethod],
    ) -> KVStorage:
        """The storage ``fp4kv eval gsm8k --kv-dtype kv`` runs: ``kv`` a format name, or
        ``recipe`` (the file's per-layer formats). With a scales file its amax set the scales,
        its ``k_offset`` (``k_offsets``, checked against the model by the caller) centers K and
        its ``k_rotation`` rotates Q/K, for every format but the reference; without one scales
        are dynamic. ``method_of`` makes a method from a format name."""
        if kv == REFERENCE:
            return cls.uniform(method_of(REFERENCE), num_layers)
        if kv == "recipe":
            recipe = None if scales_file is None else scales_file.recipe()
            if recipe is None:
                raise FP4KVError(
                    "--kv-dtype recipe needs --scales with per-layer k_format/v_format; "
                    "write one with fp4kv analyze --write-recipe"
                )
            k_methods = [method_of(name) for name in recipe[0]]
            v_methods = [method_of(name) for name in recipe[1]]
        else:
            k_methods = v_methods = [method_of(kv)] * num_layers
        if scales_file is None:
            return cls.build(k_methods, v_methods)
        return cls.build(
            k_methods,
            v_methods,
            scales_file.k_amax(),
            scales_file.v_amax(),
            k_offsets,
            scales_file.rotation(),
        )


def kv_method(name: str, dtype: torch.dtype) -> KVCacheMethod:
    """The method of format ``name``; unquantized storage is 16-bit (see below)."""
    if name != REFERENCE:
        return get_kv_cache_method(name)
    # Unquantized storage is 16-bit: a model computing in fp32 on CPU still stores a bf16 cache,
    # the reference every format's bytes and fidelity are measured against.
    return BF16KVMethod(dtype if dtype.itemsize == 2 else torch.bfloat16)


__all__ = ["REFERENCE", "KVStorage", "LayerStorage", "kv_method"]
