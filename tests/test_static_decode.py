"""Static-shape greedy decoding (the CUDA-graph path) against ``generate`` through the fused path.

On CPU the step runs eagerly with the decode-attention kernel interpreted; on a GPU it is
captured in a CUDA graph and replayed. Either way its tokens must be ``generate``'s.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM

from fp4kv_cli import fused_attention
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.evaluate import static_decode
from fp4kv_cli.models import cache_argument
from fp4kv_cli.quant.methods import LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
NEW_TOKENS = 20
EOS = 2  # the tiny models' end of sequence


def make_cache(model: torch.nn.Module, fmt: str, capacity: int) -> QuantKVCache:
    layers = model.config.num_hidden_layers
    method = get_kv_cache_method(fmt, dtype=torch.float32) if fmt == "bf16" else get_kv_cache_method(fmt)
    scales = LayerScales(k=torch.linspace(0.004, 0.01, layers), v=torch.linspace(0.001, 0.003, layers))
    return QuantKVCache.for_model(
        model.config, method, scales if method.uses_tensor_scale else None, capacity_hint=capacity
    )


def inputs(vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (3, 18), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :12] = 0
    return ids.to(device), mask.to(device)


def check_static_equals_generate(folder: Path, fmt: str, device: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    ids, mask = inputs(model.config.vocab_size, device)
    capacity = ids.shape[1] + NEW_TOKENS
    with torch.inference_mode():
        cache = make_cache(model, fmt, capacity)
        with fused_attention.fused_decode(model, cache):
            expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=0, eos_token_id=EOS,
                                      **{cache_argument(model): cache})[:, ids.shape[1]:]  # fmt: skip
    static = make_cache(model, fmt, capacity)
    assert static_decode.static_decode_supported(model, static)
    got = static_decode.greedy_static(model, static, ids, mask, NEW_TOKENS)
    assert got.shape == (ids.shape[0], NEW_TOKENS)
    compared = []
    for row, want in zip(got.tolist(), expected.tolist()):  # generate pads a row after its EOS
        end = want.index(EOS) + 1 if EOS in want else len(want)
        assert row[:end] == want[:end]
        compared.append(end)
    assert max(compared) == NEW_TOKENS  # at least one row is compared over the whole budget
    assert fused_attention.decode_read(static) == ("graph" if device == "cuda" else "static")
    assert all(layer.length == ids.shape[1] + NEW_TOKENS - 1 for layer in static.layers)
    assert static.shared.static_slots is None


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
def test_static_decode_equals_generate(
    tiny_llama_dir: Path, fmt: str, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    check_static_equals_generate(tiny_llama_dir, fmt, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4", "blockfp4"])
def test_gpu_static_decode_in_a_cuda_graph_equals_generate(tiny_llama_dir: Path, fmt: str) -> None:
    check_static_equals_generate(tiny_llama_dir, fmt, "cuda")


def test_static_decode_stops_when_every_row_has_stopped(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    monkeypatch.setattr(static_decode, "CHECK_EVERY", 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids, mask = inputs(model.config.vocab_size, "cpu")
    seen: list[int] = []

    def stopped(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.shape[1])
        return torch.full((tokens.shape[0],), tokens.shape[1] >= 8)

    cache = make_cache(model, "blockfp4", ids.shape[1] + NEW_TOKENS)
    got = static_decode.greedy_static(model, cache, ids, mask, NEW_TOKENS, stopped)
    assert got.shape == (3, 8)
    assert seen == [4, 8]


def test_static_decode_declines_what_it_cannot_run(
    tiny_qwen2_dir: Path,
    tiny_llama_dir: Path,
    interpreted_attention: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert static_decode.static_decode_supported(llama, make_cache(llama, "nvfp4", 64))
    assert not static_decode.static_decode_supported(llama, object())
    qwen2 = AutoModelForCausalLM.from_pretrained(
        tiny_qwen2_dir, dtype=torch.float32
    )  # a sliding-window layer
    assert not static_decode.static_decode_supported(qwen2, make_cache(qwen2, "nvfp4", 64))
    eager = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, attn_implementation="eager"
    )
    assert not static_decode.static_decode_supported(eager, make_cache(eager, "nvfp4", 64))
    llama.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not static_decode.static_decode_supported(llama, make_cache(llama, "nvfp4", 64))


def test_static_batch_continuations_equal_generate(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generate_batch(decode="graph")`` (static steps, eager on CPU) ends every row where
    ``generate`` does: same text, raw text and token count. The "EOS" is a token the model
    really emits mid-way, so rows end early."""
    from transformers import AutoTokenizer

    from fp4kv_cli.evaluate.generate import generate_batch, greedy_config

    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = tokenizer.unk_token
    prompts = [
        tokenizer(text).input_ids for text in ("Question: 2+3?\nAnswer:", "Hi", "A longer prompt, 7*8=")
    ]
    stops = ["Question:", "\n\n"]
    config = greedy_config(model, tokenizer, NEW_TOKENS, stops)
    capacity = max(map(len, prompts)) + NEW_TOKENS

    def run(decode: str) -> list:
        return generate_batch(
            model, tokenizer, prompts, make_cache(model, "nvfp4", capacity), config, stops, decode
        )

    first = run("fused")
    config.eos_token_id = [tokenizer(first[0].raw_text).input_ids[6]]  # row 0 then ends after ~6 tokens
    static_rows, generated = run("graph"), run("fused")
    assert static_rows == generated
    assert any(row.new_tokens < NEW_TOKENS for row in generated)


def test_row_stops_are_where_generate_stops(smollm2_dir: Path) -> None:
    """On a real tokenizer (SmolLM2's), ``RowStops`` ends rows as ``generate``'s criteria do: at
    an EOS (not counted), after the token completing a stop string (counted), special-token stop
    strings included, and a stop string that begins in the prompt."""
    from transformers import AutoTokenizer

    from fp4kv_cli.evaluate.generate import RowStops

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    stops = ["Question:", "<|im_end|>", "\n\n"]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = [
        ids(" 3 + 4 = 7. Question: what") + ids(" more text here"),
        ids(" 12 apples<|im_end|> and then"),
        ids("\nThe answer is 5") + ids(" and more words"),  # the prompt ends in "\n"
        ids(" no stop at all") + [eos] + ids(" Question: after"),
        ids(" runs to the end of the budget"),
    ]
    width = max(map(len, rows))
    tokens = torch.tensor([row + [eos] * (width - len(row)) if i != 4 else row + ids(" x") * (width - len(row))
                           for i, row in enumerate(rows)])  # fmt: skip
    plain, newline = ids("Answer: ok")[-2:], ids("Answer: ok\n")[-2:]
    assert tokenizer.decode(newline).endswith("\n") and not tokenizer.decode(plain).endswith("\n")

    def counts(row2_prompt: list[int]) -> list[int]:
        prompts = torch.tensor([plain, plain, row2_prompt, plain, plain])
        stop = RowStops(prompts, [eos], tokenizer, stops)
        for n in (3, 7, width):  # in several updates, as the decode loop checks
            stop.update(tokens[:, :n])
        return stop.counts(width).tolist()

    got = counts(newline)
    assert got[0] == len(ids(" 3 + 4 = 7. Question:"))
    assert got[1] == len(ids(" 12 apples<|im_end|>"))
    assert got[3] == len(ids(" no stop at all"))
    assert got[4] == width
    # Row 2: the prompt's trailing newline and the generated one make "\n\n" at once.
    assert got[2] == 1
    assert counts(plain)[2] > 1


def test_row_stops_at_the_first_eos() -> None:
    """``RowStops`` finds each row's first EOS (not counted) over updates: EOS as the first or the
    last token of a check, either EOS id, no EOS, a stopped row keeping its end, a repeated check."""
    from fp4kv_cli.evaluate.generate import RowStops

    tokens = torch.tensor([
        [2, 5, 5, 5, 5, 5],  # EOS first: keeps nothing
        [5, 5, 5, 7, 5, 5],  # EOS last of the first check
        [5, 5, 5, 5, 5, 5],  # no EOS: runs to the end
        [5, 2, 5, 7, 2, 5],  # stopped at its first EOS; the later ones change nothing
        [5, 5, 5, 5, 2, 5],  # EOS first of the second check
        [5, 5, 5, 5, 5, 2],  # EOS last of the second check
    ])  # fmt: skip
    stop = RowStops(torch.zeros(6, 3, dtype=torch.long), [2, 7], None, None)
    first = [True, True, False, True, False, False]
    assert stop.update(tokens[:, :4]).tolist() == first
    assert stop.update(tokens[:, :4]).tolist() == first  # nothing new to look at
    assert stop.update(tokens).tolist() == [True, True, False, True, True, True]
    assert stop.counts(6).tolist() == [0, 3, 6, 1, 4, 5]
    no_eos = RowStops(torch.zeros(6, 3, dtype=torch.long), [], None, None)
    assert not no_eos.update(tokens).any()
    assert no_eos.counts(6).tolist() == [6] * 6
