"""The fused decode attention (reads K/V straight from the cache buffers) against the gather path.

On CPU the Triton kernels run interpreted (``TRITON_INTERPRET=1``, a private copy of the kernel
modules); the same checks run compiled on a GPU. The kernel must equal attention over the
method's own ``dequantize`` output (softmax and products in fp32, so up to rounding of the
output and of the probabilities), for every K/V format pair, GQA, masks and token splits; and
generation through :func:`fused_decode` must match the gather read path.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from fp4kv_cli import fused_attention
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.models import cache_argument
from fp4kv_cli.quant.methods import LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method
from fp4kv_cli.quant.rotation import QKRotation

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
#: (K format, V format, model dtype): every format on both sides, each dtype.
CASES = [
    ("nvfp4", "nvfp4", torch.bfloat16),
    ("blockfp4", "blockfp4", torch.bfloat16),
    ("fp8", "fp8", torch.bfloat16),
    ("bf16", "bf16", torch.bfloat16),
    ("nvfp4", "fp8", torch.float16),
    ("fp8", "blockfp4", torch.float32),
    ("bf16", "nvfp4", torch.float32),
]


def stored(kernels: ModuleType, fmt: str, x: torch.Tensor, capacity: int, dtype: torch.dtype):
    """``x [batch, length, heads, dim]`` written through method ``fmt`` into slots
    ``b * capacity + t``: the kernel's source and the method's own dequantized values."""
    batch, length, heads, dim = x.shape
    method = get_kv_cache_method(fmt, dtype=dtype) if fmt == "bf16" else get_kv_cache_method(fmt)
    made = method.create_buffers(batch * capacity, heads, dim, 1, x.device)
    data = made["k_buffer"][0]
    scales = made["k_scale_buffer"][0] if made["k_scale_buffer"] else None
    divisor = 6 * 448 if fmt == "nvfp4" else 448
    tensor_scale = (x.abs().amax().float() / divisor).reshape(()) if method.uses_tensor_scale else None
    loc = torch.arange(batch, device=x.device)[:, None] * capacity + torch.arange(length, device=x.device)
    loc = loc.reshape(-1)
    method.store(data, scales, loc, x.reshape(-1, heads, dim), tensor_scale)
    values = method.dequantize(data, scales, loc, tensor_scale, dtype).reshape(x.shape)
    return kernels.KVSource(fmt, data, scales, tensor_scale), values


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """fp32 attention of ``q [b, hq, d]`` over ``k, v [b, L, hkv, d]`` with ``mask [b, L]``."""
    group = q.shape[1] // k.shape[2]
    k, v = k.float().repeat_interleave(group, 2), v.float().repeat_interleave(group, 2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k) * scale
    weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhl,blhd->bhd", weights, v)


def check_kernel(kernels: ModuleType, k_fmt: str, v_fmt: str, dtype: torch.dtype, device: str, splits: int | None,
                 batch: int = 3, length: int = 150, dim: int = 64) -> None:  # fmt: skip
    gen = torch.Generator().manual_seed(zlib.crc32(f"{k_fmt}{v_fmt}{dtype}".encode()))
    capacity, kv_heads, group = length + 37, 2, 3
    k_x = (torch.randn(batch, length, kv_heads, dim, generator=gen) * 3 + 1).to(device)
    v_x = torch.randn(batch, length, kv_heads, dim, generator=gen).to(device)
    k_src, k_vals = stored(kernels, k_fmt, k_x, capacity, dtype)
    v_src, v_vals = stored(kernels, v_fmt, v_x, capacity, dtype)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen).to(device, dtype)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :11] = False
    mask[2, : length - 3] = False
    mask[1, 70:90] = False  # a hole, as a sliding window or a custom mask leaves
    mask = mask.to(device)
    got = kernels.decode_attention(q, k_src, v_src, length, capacity, mask, dim**-0.5, num_splits=splits)
    want = attention_reference(q, k_vals, v_vals, mask, dim**-0.5)
    assert got.shape == q.shape and got.dtype == dtype
    # Output rounding (the interpreter truncates to bf16) and probabilities rounded to 16 bits.
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tolerance * want.abs().max().item())
    shared = mask[1:2]  # one row for every sequence (a broadcast mask)
    torch.testing.assert_close(
        kernels.decode_attention(q, k_src, v_src, length, capacity, shared, dim**-0.5, num_splits=splits).float(),
        attention_reference(q, k_vals, v_vals, shared.expand_as(mask), dim**-0.5),
        rtol=0, atol=tolerance * want.abs().max().item(),
    )  # fmt: skip
    unmasked = kernels.decode_attention(q, k_src, v_src, length, capacity, None, dim**-0.5, num_splits=splits)
    full = torch.ones_like(mask)
    torch.testing.assert_close(
        unmasked.float(), attention_reference(q, k_vals, v_vals, full, dim**-0.5),
        rtol=0, atol=tolerance * want.abs().max().item(),
    )  # fmt: skip


@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "three-splits"])
@pytest.mark.parametrize(("k_fmt", "v_fmt", "dtype"), CASES)
def test_kernel_equals_attention_over_dequantized_values(
    interpreted_attention: ModuleType, k_fmt: str, v_fmt: str, dtype: torch.dtype, splits: int
) -> None:
    check_kernel(interpreted_attention, k_fmt, v_fmt, dtype, "cpu", splits)


def test_kernel_sees_a_wrong_scale(interpreted_attention: ModuleType) -> None:
    """The comparison above can fail: V read with K's scale is far off."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 2, 32, generator=gen)
    k_src, k_vals = stored(interpreted_attention, "nvfp4", x * 4, 48, torch.float32)
    v_src, v_vals = stored(interpreted_attention, "nvfp4", x, 48, torch.float32)
    wrong = interpreted_attention.KVSource("nvfp4", v_src.data, v_src.block_scales, k_src.tensor_scale)
    q = torch.randn(2, 4, 32, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.bool)
    got = interpreted_attention.decode_attention(q, k_src, wrong, 40, 48, mask, 32**-0.5)
    assert (got - attention_reference(q, k_vals, v_vals, mask, 32**-0.5)).abs().max() > 0.1


@CUDA
@pytest.mark.parametrize(("k_fmt", "v_fmt", "dtype"), CASES)
def test_gpu_kernel_equals_attention_over_dequantized_values(
    k_fmt: str, v_fmt: str, dtype: torch.dtype
) -> None:
    from fp4kv_cli.quant.kernels import decode_attention

    for splits in (1, 3, None):
        check_kernel(decode_attention, k_fmt, v_fmt, dtype, "cuda", splits, batch=5, length=700, dim=128)


def generate(
    folder: Path, fmt: str, device: str, fused: bool, rotation: QKRotation | None = None
) -> tuple[Any, QuantKVCache, list[bool]]:
    """Greedy generation with left padding (fp32 tiny model) through a ``fmt`` cache (with
    ``rotation``: K centered on random offsets, then rotated); returns the output, the cache and,
    per decode step and layer, whether the fused kernel served it."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    text = model.config.get_text_config()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, text.vocab_size, (3, 20), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :13] = 0
    layers = text.num_hidden_layers
    method = get_kv_cache_method(fmt, dtype=torch.float32) if fmt == "bf16" else get_kv_cache_method(fmt)
    scales = LayerScales(k=torch.rand(layers, generator=gen) * 0.01 + 0.002,
                         v=torch.rand(layers, generator=gen) * 0.002 + 0.001)  # fmt: skip
    offsets = None
    if rotation is not None:
        head_dim = text.hidden_size // text.num_attention_heads
        offsets = torch.randn(layers, text.num_key_value_heads, head_dim, generator=gen).to(device) * 0.3
    cache = QuantKVCache.for_model(
        model.config, method, scales if method.uses_tensor_scale else None, offsets, rotation=rotation
    )
    served: list[bool] = []
    kwargs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 16, "min_new_tokens": 16,
              "do_sample": False, "pad_token_id": 0, "output_scores": True, "return_dict_in_generate": True}  # fmt: skip
    real = fused_attention.layer_attention

    def counting(layer: Any, *args: Any) -> torch.Tensor:
        served.append(True)
        return real(layer, *args)

    with torch.inference_mode(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_attention, "layer_attention", counting)
        if fused:
            before = model.config._attn_implementation
            with fused_attention.fused_decode(model, cache) as on:
                assert on
                assert model.config._attn_implementation == fused_attention.ATTENTION_NAME
                out = model.generate(**kwargs, **{cache_argument(model): cache})
            assert model.config._attn_implementation == before
            assert fused_attention.decode_read(cache) == "fused"
        else:
            out = model.generate(**kwargs, **{cache_argument(model): cache})
    return out, cache, served


def check_generation(folder: Path, fmt: str, device: str, rotation: QKRotation | None = None) -> None:
    fused, _, served = generate(folder, fmt, device, fused=True, rotation=rotation)
    gathered, _, not_served = generate(folder, fmt, device, fused=False, rotation=rotation)
    layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    assert len(served) == 15 * layers and not not_served  # every decode step of every layer
    assert torch.equal(fused.sequences, gathered.sequences)
    got, want = torch.stack(fused.scores), torch.stack(gathered.scores)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4"])  # blockfp4 tiles: the kernel test above
def test_fused_generation_equals_gather_path(
    tiny_qwen2_dir: Path, fmt: str, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny Qwen2 (GQA 3, a sliding-window layer, left padding): same tokens, logits within 1e-4."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    check_generation(tiny_qwen2_dir, fmt, "cpu")


@pytest.mark.slow
def test_fused_generation_with_rotation_equals_gather_path(
    tiny_qwen2_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Centered + rotated (blocks of 16) nvfp4_4over6 K: the kernel reads rotated K with the rotated
    query, the gather path rotates K back for SDPA; same tokens, logits within 1e-4 (the full
    head_dim rotation runs on the GPU and in tests/test_rotation.py)."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    check_generation(tiny_qwen2_dir, "nvfp4_4over6", "cpu", QKRotation(16))


@CUDA
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4", "blockfp4"])
def test_gpu_fused_generation_equals_gather_path(tiny_qwen2_dir: Path, fmt: str) -> None:
    check_generation(tiny_qwen2_dir, fmt, "cuda")


@CUDA
@pytest.mark.parametrize("block", [16, 32])
def test_gpu_fused_generation_with_rotation_equals_gather_path(tiny_qwen2_dir: Path, block: int) -> None:
    check_generation(tiny_qwen2_dir, "nvfp4_4over6", "cuda", QKRotation(block))


def test_fused_decode_leaves_other_caches_alone(tiny_llama_dir: Path, interpreted_attention: ModuleType,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    before = model.config._attn_implementation
    with fused_attention.fused_decode(model, DynamicCache(config=model.config)) as on:
        assert not on
        assert model.config._attn_implementation == before


def test_fused_decode_leaves_non_sdpa_models_alone(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model on eager attention (softcapping, sinks ... that SDPA would drop) keeps the gather read."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, attn_implementation="eager"
    )
    cache = QuantKVCache.for_model(model.config, get_kv_cache_method("blockfp4"))
    with fused_attention.fused_decode(model, cache) as on:
        assert not on
        assert model.config._attn_implementation == "eager"
        assert all(layer.fuse_if is None for layer in cache.layers)


def test_fused_decode_restores_the_model_after_an_error(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    before = model.config._attn_implementation
    cache = QuantKVCache.for_model(model.config, get_kv_cache_method("blockfp4"))
    with pytest.raises(RuntimeError), fused_attention.fused_decode(model, cache) as on:
        assert on and model.config._attn_implementation == fused_attention.ATTENTION_NAME
        raise RuntimeError("interrupted")
    assert model.config._attn_implementation == before
    assert all(layer.fuse_if is None for layer in cache.layers)


def test_a_forward_that_skips_the_cache_update_gets_sdpa(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel read is one-shot: a one-token forward after a fused step that does not store
    into the cache (here ``use_cache=False``) attends to its own K/V, as without the context."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    cache = QuantKVCache.for_model(model.config, get_kv_cache_method("bf16", dtype=torch.float32))
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        alone = model(input_ids=ids[:, :1], use_cache=False).logits
        with fused_attention.fused_decode(model, cache):
            model(input_ids=ids[:, :8], **{cache_argument(model): cache})
            model(input_ids=ids[:, 8:], **{cache_argument(model): cache})
            assert fused_attention.decode_read(cache) == "fused"
            got = model(input_ids=ids[:, :1], use_cache=False).logits
    torch.testing.assert_close(got, alone)
