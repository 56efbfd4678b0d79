"""Automatic batch size from free memory and the format's KV bytes per token (free memory mocked)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate import batching
from fp4kv_cli.quant.methods import BF16KVMethod
from fp4kv_cli.quant.registry import get_kv_cache_method

CUDA = torch.device("cuda")
#: Qwen2.5-1.5B's shape: 28 layers, 12 query / 2 KV heads of 128, hidden 1536, MLP 8960.
Q15 = SimpleNamespace(num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                      hidden_size=1536, intermediate_size=8960, vocab_size=151936)  # fmt: skip


def _cache(fmt: str, layers: int = 28) -> QuantKVCache:
    method = BF16KVMethod(torch.bfloat16) if fmt == "bf16" else get_kv_cache_method(fmt)
    return QuantKVCache(method, layers)


def test_kv_bytes_per_token_of_each_format() -> None:
    assert batching.kv_bytes_per_token(_cache("bf16"), 2, 128) == 28 * 2 * 2 * 128 * 2  # 28,672
    assert batching.kv_bytes_per_token(_cache("fp8"), 2, 128) == 28 * 2 * 2 * 128
    assert batching.kv_bytes_per_token(_cache("nvfp4"), 2, 128) == 28 * 2 * 2 * (64 + 8)  # 8,064


def test_formula_with_mocked_free_memory() -> None:
    """The documented formula, worked by hand for the 1.5B at a GSM8K-like 1,100 + 256 tokens."""
    free = 20 * 2**30
    plan = batching.auto_batch_size(Q15, _cache("bf16"), torch.bfloat16, CUDA, 1100 + 256, 10_000, 16384,
                                    free_bytes=lambda device: free)  # fmt: skip
    capacity = 1536  # 1356 rounded up to 256
    row = capacity * (28_672 + 2 * (2 + 12) * 128 * 2) + 2 * 151936 * 4
    reserve = 16384 * (2 * (6 * 1536 + 3 * 8960) + capacity)
    assert (plan.capacity_tokens, plan.kv_bytes_per_token, plan.row_bytes, plan.reserve_bytes) == (
        capacity, 28_672, row, reserve)  # fmt: skip
    assert plan.batch == int((batching.MEMORY_FRACTION * free - reserve) // row) == 302
    assert plan.free_bytes == free
    fp4 = batching.auto_batch_size(Q15, _cache("nvfp4"), torch.bfloat16, CUDA, 1356, 10_000, 16384,
                                   free_bytes=lambda device: free)  # fmt: skip
    assert fp4.batch > 2 * plan.batch  # the smaller cache fits more rows in the same memory
    few = batching.auto_batch_size(Q15, _cache("bf16"), torch.bfloat16, CUDA, 1356, 7, 16384,
                                   free_bytes=lambda device: free)  # fmt: skip
    assert few.batch == 7  # never more rows than sequences


def test_cpu_uses_the_fixed_default() -> None:
    def no_query(device: torch.device) -> int:
        raise AssertionError("no free-memory query off CUDA")

    plan = batching.auto_batch_size(Q15, _cache("bf16"), torch.float32, torch.device("cpu"), 900, 100, 16384,
                                    free_bytes=no_query)  # fmt: skip
    assert plan.batch == batching.CPU_BATCH_SIZE and plan.free_bytes is None
    assert batching.auto_batch_size(Q15, _cache("bf16"), torch.float32, torch.device("cpu"), 900, 3, 16384,
                                    free_bytes=no_query).batch == 3  # fmt: skip


def test_no_row_fits_is_a_one_line_error() -> None:
    with pytest.raises(FP4KVError, match="hold no sequence of 32768 tokens.*--prefill-chunk"):
        batching.auto_batch_size(Q15, _cache("bf16"), torch.bfloat16, CUDA, 32768, 1, 16384,
                                 free_bytes=lambda device: 2**30)  # fmt: skip
