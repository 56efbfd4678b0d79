"""Registries of KV cache formats: the FP4 quant methods, and every format the cache can hold."""

from __future__ import annotations

from typing import Any

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.methods import (
    BF16KVMethod,
    BlockFP4KVMethod,
    FP4KVCacheQuantMethod,
    FP8KVMethod,
    KVCacheMethod,
    NVFP4KVMethod,
    NVFP4Over6KVMethod,
)

FP4_KV_CACHE_QUANT_REGISTRY: dict[str, type[FP4KVCacheQuantMethod]] = {
    "nvfp4": NVFP4KVMethod,
    "nvfp4_4over6": NVFP4Over6KVMethod,
    "blockfp4": BlockFP4KVMethod,
}

#: Every KV storage format: the FP4 methods plus the fp8 and bf16 references.
KV_CACHE_METHOD_REGISTRY: dict[str, type[KVCacheMethod]] = {
    "bf16": BF16KVMethod,
    "fp8": FP8KVMethod,
    **FP4_KV_CACHE_QUANT_REGISTRY,
}


def _lookup(registry: dict[str, type[KVCacheMethod]], name: str, what: str) -> type[KVCacheMethod]:
    key = name.strip().lower()
    if key not in registry:
        raise FP4KVError(f"unknown {what} {name!r}; known: {', '.join(registry)}")
    return registry[key]


def get_fp4_kv_cache_quant_method(name: str, **kwargs: Any) -> FP4KVCacheQuantMethod:
    """Instantiate the FP4 KV quant method registered as ``name`` (``nvfp4``, ``nvfp4_4over6``, ``blockfp4``)."""
    return _lookup(FP4_KV_CACHE_QUANT_REGISTRY, name, "FP4 KV cache quant method")(**kwargs)


def get_kv_cache_method(name: str, **kwargs: Any) -> KVCacheMethod:
    """Instantiate any KV storage format by name (``bf16``, ``fp8``, ``nvfp4``, ``nvfp4_4over6``, ``blockfp4``)."""
    return _lookup(KV_CACHE_METHOD_REGISTRY, name, "KV cache dtype")(**kwargs)
