"""Chunked prefill through the quantized cache: exact with bf16 storage, reads the stored prefix
with FP4 storage, and the decode paths built on it generate what the unchunked ones do."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_cache_generation import FakeQuantLayer
from transformers import AutoModelForCausalLM, DynamicCache

from fp4kv_cli import fused_attention
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate import static_decode
from fp4kv_cli.evaluate.generate import generate_batch, greedy_config
from fp4kv_cli.evaluate.prefill import check_prefill_chunk, chunked_prefill, row_chunk
from fp4kv_cli.models import cache_argument, load_model_and_tokenizer
from fp4kv_cli.quant.methods import BF16KVMethod, LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
UNCHUNKED = 1 << 30


def _model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (3, 37), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    mask[2, :20] = 0
    return ids, mask


def _scales(layers: int) -> LayerScales:
    return LayerScales(k=torch.linspace(0.004, 0.01, layers), v=torch.linspace(0.001, 0.003, layers))


def test_row_chunk_and_option() -> None:
    assert row_chunk(16384, 128) == 128
    assert row_chunk(100, 3) == 33
    assert row_chunk(8, 1319) == 1  # never below one position per row
    with pytest.raises(FP4KVError, match="--prefill-chunk"):
        check_prefill_chunk(0)


def test_bf16_chunked_prefill_equals_one_forward(tiny_llama_dir: Path) -> None:
    """With exact (fp32 model, fp32 storage) K/V the chunks see the same prefix one forward sees:
    logits agree to float rounding, and greedy continuations from either cache are identical."""
    model = _model(tiny_llama_dir)
    ids, mask = _inputs(model.config.vocab_size)
    caches, logits = [], []
    for budget in (UNCHUNKED, 3 * 5, 3 * 1):  # one forward; 5 positions per row; 1 per row
        cache = QuantKVCache.for_model(model.config, BF16KVMethod(torch.float32), capacity_hint=64)
        logits.append(chunked_prefill(model, cache, ids, mask, budget))
        caches.append(cache)
        assert all(layer.length == ids.shape[1] for layer in cache.layers)
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=0, atol=1e-5)
    with torch.inference_mode():  # reads fill the layers' read buffers, made in inference mode
        for layer, chunked in zip(caches[0].layers, caches[1].layers):
            torch.testing.assert_close(chunked._read(ids.shape[1]), layer._read(ids.shape[1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
def test_fp4_chunks_read_the_stored_prefix(tiny_llama_dir: Path, device: str) -> None:
    """nvfp4: each chunk attends to the round-tripped prefix (as a fake-quant cache that returns
    its stored K/V for the past and fresh K/V for the chunk), not to fresh K/V of the prefix
    (on CUDA through the compiled store/gather kernels)."""
    model = _model(tiny_llama_dir).to(device)
    ids, mask = (t.to(device) for t in _inputs(model.config.vocab_size))
    layers = model.config.num_hidden_layers
    scales = LayerScales(*(t.to(device) for t in (_scales(layers).k, _scales(layers).v)))
    budget = 3 * 8

    def quant_cache() -> QuantKVCache:
        return QuantKVCache.for_model(model.config, get_kv_cache_method("nvfp4"), scales, capacity_hint=64)

    chunked = chunked_prefill(model, quant_cache(), ids, mask, budget)
    one_forward = chunked_prefill(model, quant_cache(), ids, mask, UNCHUNKED)
    reference = DynamicCache(config=model.config)
    reference.layers = [FakeQuantLayer("nvfp4", scales.k[i], scales.v[i], None) for i in range(layers)]
    reference.set_token_mask = lambda mask: None  # a DynamicCache has no dynamic scales
    expected = chunked_prefill(model, reference, ids, mask, budget)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-5)
    assert (chunked - one_forward).abs().max() > 1e-3  # the prefix really came back quantized


def test_generate_path_chunked_equals_unchunked(tiny_llama_dir: Path) -> None:
    """``generate_batch`` (gather read): prefill in chunks but the last token, then ``generate``."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), "cpu", "fp32")
    prompts = [
        tokenizer(t)["input_ids"] for t in ("Question: 2 + 3 = ?", "Hi", "A longer prompt, with words.")
    ]
    config = greedy_config(model, tokenizer, 12, ["Question:"])
    runs = []
    for budget in (UNCHUNKED, 3 * 4):
        cache = QuantKVCache.for_model(model.config, BF16KVMethod(torch.float32), capacity_hint=64)
        runs.append(generate_batch(model, tokenizer, prompts, cache, config, ["Question:"], "gather", budget))
        assert cache.layers[0].length > max(map(len, prompts))
    assert runs[0] == runs[1]
    assert any(c.new_tokens > 0 for c in runs[0])


def test_static_decode_chunked_equals_unchunked(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The static-shape decode after a chunked prefill gives the unchunked tokens (bf16 storage)."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    model = _model(tiny_llama_dir)
    ids, mask = _inputs(model.config.vocab_size)
    runs = []
    for budget in (UNCHUNKED, 3 * 7):
        cache = QuantKVCache.for_model(
            model.config, BF16KVMethod(torch.float32), capacity_hint=ids.shape[1] + 8
        )
        assert static_decode.static_decode_supported(model, cache)
        runs.append(static_decode.greedy_static(model, cache, ids, mask, 8, prefill_chunk=budget))
    assert torch.equal(runs[0], runs[1])


def test_generate_continues_a_filled_cache(tiny_llama_dir: Path) -> None:
    """transformers' ``generate`` feeds only the uncached last prompt token after the prefill."""
    model = _model(tiny_llama_dir)
    ids, mask = _inputs(model.config.vocab_size)
    cache = QuantKVCache.for_model(model.config, BF16KVMethod(torch.float32), capacity_hint=64)
    chunked_prefill(model, cache, ids, mask, 3 * 6, ids.shape[1] - 1)
    assert cache.get_seq_length() == ids.shape[1] - 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                             pad_token_id=0, **{cache_argument(model): cache})  # fmt: skip
    assert out.shape == (3, ids.shape[1] + 2)
    assert cache.get_seq_length() == ids.shape[1] + 1
