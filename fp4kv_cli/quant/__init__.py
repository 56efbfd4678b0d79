"""The shared FP4 KV quant core: formats, reference math, methods and their registry.

Free of transformers imports so serving code can reuse it.
"""

from fp4kv_cli.quant.methods import (
    BF16KVMethod,
    BlockFP4KVMethod,
    FP4KVCacheQuantMethod,
    FP8KVMethod,
    KVCacheMethod,
    LayerScales,
    NVFP4KVMethod,
    NVFP4Over6KVMethod,
)
from fp4kv_cli.quant.registry import (
    FP4_KV_CACHE_QUANT_REGISTRY,
    KV_CACHE_METHOD_REGISTRY,
    get_fp4_kv_cache_quant_method,
    get_kv_cache_method,
)
from fp4kv_cli.quant.utils import BlockFP4KVQuantizeUtil, NVFP4KVQuantizeUtil

__all__ = [
    "FP4_KV_CACHE_QUANT_REGISTRY",
    "KV_CACHE_METHOD_REGISTRY",
    "BF16KVMethod",
    "BlockFP4KVMethod",
    "BlockFP4KVQuantizeUtil",
    "FP4KVCacheQuantMethod",
    "FP8KVMethod",
    "KVCacheMethod",
    "LayerScales",
    "NVFP4KVMethod",
    "NVFP4KVQuantizeUtil",
    "NVFP4Over6KVMethod",
    "get_fp4_kv_cache_quant_method",
    "get_kv_cache_method",
]
