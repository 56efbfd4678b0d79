"""Refilled static decode (continuous batching) against the batch path: every question's tokens.

The decode steps read the cache's buffers through a stand-in for the Triton kernel: a PyTorch
reader (``scripts/refill_measure.py``) that dequantizes every slot with the layer's methods and
attends under the step's mask (the interpreted kernel takes minutes for these step counts on a CPU). One test runs the
interpreted kernel itself, at a small size.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from conftest import load_script
from transformers import AutoModelForCausalLM, AutoTokenizer

from fp4kv_cli import fused_attention
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.evaluate import static_decode
from fp4kv_cli.evaluate.generate import generate_batch, generate_tokens, greedy_config
from fp4kv_cli.evaluate.refill import RefillCounts, SlotStops, generate_refilled, refill_refusal
from fp4kv_cli.evaluate.sampling import RowSampler, SamplingSpec, row_keys
from fp4kv_cli.quant.methods import LayerScales
from fp4kv_cli.quant.registry import get_kv_cache_method

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
NEW_TOKENS = 12
TEXTS = ("Question: 2+3?\nAnswer:", "Hi", "A longer prompt, 7*8=", "abc", "The quick brown fox", "x=1; y=",
         "Zebra!")  # fmt: skip
STOPS = ["Question:", "\n\n"]


def torch_reader() -> SimpleNamespace:
    """The PyTorch stand-in for the decode-attention kernel (``scripts/refill_measure.py``)."""
    return load_script("refill_measure").torch_reader()


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = torch_reader()
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: kernels)


def cache_maker(model: torch.nn.Module, fmt: str, center: bool = True):
    """``capacity -> cache`` of ``fmt`` with static scales and (``center``) K offsets."""
    layers = model.config.num_hidden_layers
    method = get_kv_cache_method(fmt, dtype=torch.float32) if fmt == "bf16" else get_kv_cache_method(fmt)
    scales = LayerScales(k=torch.linspace(0.004, 0.01, layers), v=torch.linspace(0.001, 0.003, layers))
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    offsets = (
        torch.randn(layers, heads, dim, generator=torch.Generator().manual_seed(3)) * 0.1 if center else None
    )

    def make(capacity: int) -> QuantKVCache:
        return QuantKVCache.for_model(model.config, method, scales if method.uses_tensor_scale else None,
                                      k_offsets=offsets, capacity_hint=capacity)  # fmt: skip

    return make


def load(folder: Path):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.unk_token
    return model, tokenizer, [tokenizer(text).input_ids for text in TEXTS]


def batch_path(model, tokenizer, prompts, make, config, batch, sampler_of=None):
    """Each prompt's continuation on the batch path, batches of ``batch`` in the given order."""
    out = []
    for first in range(0, len(prompts), batch):
        group = prompts[first : first + batch]
        sampler = None if sampler_of is None else sampler_of(range(first, first + len(group)))
        out += generate_batch(model, tokenizer, group, make(max(map(len, group)) + config.max_new_tokens),
                              config, STOPS, "graph", sampler=sampler)  # fmt: skip
    return out


def refilled(model, tokenizer, prompts, make, config, batch, sampler=None, counts=None):
    out: dict[int, object] = {}
    for items, texts, stats in generate_refilled(model, tokenizer, prompts, make, config, STOPS, batch,
                                                 sampler=sampler, counts=counts):  # fmt: skip
        assert len(items) == len(texts) == len(stats)
        assert not set(items) & set(out)
        out.update(zip(items, texts))
    assert sorted(out) == list(range(len(prompts)))
    return [out[i] for i in range(len(prompts))]


def early_eos(model, tokenizer, prompts, make, config) -> None:
    """Make the "EOS" tokens the model really emits at different steps, so rows end early."""
    tokens, _ = generate_tokens(model, tokenizer, prompts, make(64), config, "graph")
    config.eos_token_id = sorted({int(tokens[0, 3]), int(tokens[3, 1]), int(tokens[6, 5])})


def check_refill_equals_batches(folder: Path, fmt: str, device: str) -> None:
    """Every question's continuation (text, raw text, token count) through refilled slots is the
    batch path's, for several slot counts and prompt orders, K centering on; rows end at
    different steps (EOS and budget), and the refilled run computes fewer slot-steps."""
    model, tokenizer, prompts = load(folder)
    model.to(device)
    make = cache_maker(model, fmt)
    config = greedy_config(model, tokenizer, NEW_TOKENS, STOPS)
    early_eos(model, tokenizer, prompts, make, config)
    want = batch_path(model, tokenizer, prompts, make, config, 3)
    lengths = sorted({row.new_tokens for row in want})
    assert len(lengths) > 2 and lengths[-1] == NEW_TOKENS  # rows stop at different points
    counts = {}
    for batch, order in ((3, range(7)), (2, [6, 5, 4, 3, 2, 1, 0]), (4, [3, 0, 6, 1, 5, 2, 4])):
        order = list(order)
        counts[batch] = RefillCounts()
        got = refilled(
            model, tokenizer, [prompts[i] for i in order], make, config, batch, counts=counts[batch]
        )
        assert [got[order.index(i)] for i in range(7)] == want, (batch, order)
        assert counts[batch].rows == 7 and counts[batch].kept_tokens == sum(row.new_tokens for row in want)
        assert counts[batch].prefills > 1
    # the batch path runs each batch of 3 at least until its longest row has its tokens
    batch_steps = sum(3 * (max(r.new_tokens for r in want[f : f + 3]) - 1) for f in (0, 3, 6))
    assert counts[3].slot_steps < batch_steps


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4", "blockfp4"])
def test_refilled_rows_equal_the_batch_path(
    tiny_llama_dir: Path, fmt: str, reader: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(static_decode, "CHECK_EVERY", 4)
    check_refill_equals_batches(tiny_llama_dir, fmt, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "nvfp4", "blockfp4"])
def test_gpu_refilled_rows_in_a_cuda_graph_equal_the_batch_path(
    tiny_llama_dir: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on CUDA with the compiled kernel: the refill prefill runs between replays of the
    one captured step and changes its tensors in place."""
    monkeypatch.setattr(static_decode, "CHECK_EVERY", 4)
    check_refill_equals_batches(tiny_llama_dir, fmt, "cuda")


def test_refilled_sampling_draws_each_rows_own_tokens(tiny_llama_dir: Path, reader: None) -> None:
    """Sampled rows keyed by (seed, question, sample) draw the batch path's tokens when refilled."""
    model, tokenizer, prompts = load(tiny_llama_dir)
    make = cache_maker(model, "nvfp4")
    config = greedy_config(model, tokenizer, NEW_TOKENS, STOPS)
    early_eos(model, tokenizer, prompts, make, config)
    spec = SamplingSpec(temperature=1.5, top_p=0.9, seed=4)

    def sampler_of(items) -> RowSampler:
        items = list(items)
        return RowSampler(spec, row_keys(spec.seed, items, [1] * len(items)))

    want = batch_path(model, tokenizer, prompts, make, config, 4, sampler_of)
    greedy = batch_path(model, tokenizer, prompts, make, config, 4)
    assert want != greedy
    got = refilled(model, tokenizer, prompts, make, config, 3, sampler_of(range(7)))
    assert got == want


@pytest.mark.slow
def test_refill_with_the_interpreted_kernel(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton kernel (interpreted) reads the refilled slots as the batch path's steps do."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    model, tokenizer, prompts = load(tiny_llama_dir)
    prompts = prompts[:3]
    make = cache_maker(model, "nvfp4")
    config = greedy_config(model, tokenizer, 6, STOPS)
    config.eos_token_id = [eos_of(model, tokenizer, prompts, make, config)]
    want = batch_path(model, tokenizer, prompts, make, config, 3)
    assert len({row.new_tokens for row in want}) > 1
    assert refilled(model, tokenizer, prompts, make, config, 2) == want


def eos_of(model, tokenizer, prompts, make, config) -> int:
    """A token the first row emits at its third step."""
    tokens, _ = generate_tokens(model, tokenizer, prompts[:1], make(64), config, "graph")
    return int(tokens[0, 2])


def test_budget_of_one_token_and_one_slot(tiny_llama_dir: Path, reader: None) -> None:
    """One new token: the prefill's token only, no decode step; one slot: rows one after another."""
    model, tokenizer, prompts = load(tiny_llama_dir)
    make = cache_maker(model, "blockfp4", center=False)
    for budget in (1, 5):
        config = greedy_config(model, tokenizer, budget, STOPS)
        counts = RefillCounts()
        got = refilled(model, tokenizer, prompts[:4], make, config, 1, counts=counts)
        assert got == batch_path(model, tokenizer, prompts[:4], make, config, 1)
        assert counts.prefills == 4 and (counts.steps == 0) == (budget == 1)


def test_refill_refuses_dynamic_scales(tiny_llama_dir: Path, reader: None) -> None:
    model, _, _ = load(tiny_llama_dir)
    static = cache_maker(model, "nvfp4")(64)
    assert refill_refusal(model, static) is None
    dynamic = QuantKVCache.for_model(model.config, get_kv_cache_method("nvfp4"), None, capacity_hint=64)
    assert "dynamic" in refill_refusal(model, dynamic)
    assert refill_refusal(model, object()) == static_decode.static_decode_refusal(model, object())


def test_slot_stops_follow_each_slot(smollm2_dir: Path) -> None:
    """On a real tokenizer, ``SlotStops`` ends each slot's row at its first EOS (not counted) or
    after the token completing a stop string (counted; one begun in the prompt too) over several
    checks, and a restarted slot forgets its old row."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = [ids(" 3 + 4") + [eos] + ids(" more words here and"), ids("\nThe answer is 5 and more"),
            ids(" 12 apples. Question: what more")]  # fmt: skip
    width = 8
    rows = [(row + [eos] * width)[:width] for row in rows]
    stops = SlotStops(3, width, [eos], tokenizer, ["Question:", "\n\n"], 0, torch.device("cpu"))
    for row, prompt in enumerate(["Answer: ok", "Answer: ok\n", "Answer: ok"]):
        stops.start(torch.tensor([row]), [ids(prompt)], torch.tensor([rows[row][0]]))
        stops.history[row, stops.tail : stops.tail + width] = torch.tensor(rows[row])
    stop_at = len(ids(" 12 apples. Question:"))
    columns = torch.tensor([2, 3, stop_at - 1])
    assert stops.update(columns).tolist() == [False, True, False]  # the prompt's "\n" + "\n"
    columns = torch.tensor([width, 3, width])
    assert stops.update(columns).tolist() == [True, True, True]
    assert stops.counts(columns).tolist() == [len(ids(" 3 + 4")), 1, stop_at]
    stops.start(torch.tensor([1]), [ids("Answer: ok")], torch.tensor(ids(" x")))
    columns = torch.tensor([width, 1, width])
    assert stops.update(columns).tolist() == [True, False, True]
    assert stops.counts(columns).tolist() == [len(ids(" 3 + 4")), 1, stop_at]
    assert stops.tokens([2, 0], [stop_at, 2]) == [rows[2][:stop_at], rows[0][:2]]


def test_eval_gsm8k_refills_by_default(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fp4kv eval gsm8k`` (graph decode, calibrated scales + K centering) refills rows by default
    and records it; ``--no-refill`` runs one batch at a time; every question's output is the same.
    Dynamic scales fall back to batches, said on the console."""
    import json

    from typer.testing import CliRunner

    from fp4kv_cli.cli import app
    from fp4kv_cli.evaluate import runner
    from fp4kv_cli.quant.scales import config_hash

    kernels = torch_reader()
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: kernels)
    monkeypatch.setattr(runner, "decode_kernels", lambda: kernels)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    layers = [
        {"index": i, "k_amax": 3.0, "v_amax": 2.0, "k_offset": [[0.1] * 16, [-0.2] * 16]} for i in range(2)
    ]
    scales = {
        "schema": "fp4kv.scales",
        "version": 1,
        "model": {"config_hash": config_hash(config)},
        "layers": layers,
    }
    (tmp_path / "scales.json").write_text(json.dumps(scales))
    common = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "bf16,nvfp4", "--limit", "5",
              "--batch-size", "2", "--no-fidelity", "--num-fewshot", "0", "--max-new-tokens", "6",
              "--device", "cpu", "--dtype", "bf16", "--out", str(tmp_path), "--scales", str(tmp_path / "scales.json")]  # fmt: skip
    outputs = {}
    for name, extra in (("on", []), ("off", ["--no-refill"])):
        result = CliRunner().invoke(app, [*common, "--run-name", name, *extra])
        assert result.exit_code == 0, result.output
        run = tmp_path / name
        assert json.loads((run / "config.json").read_text())["refill"] is (name == "on"), result.output
        summary = json.loads((run / "summary.json").read_text())
        for kv in ("bf16", "nvfp4"):
            assert summary["results"][kv]["refilled_rows"] == (5 if name == "on" else 0), result.output
            records = [json.loads(line) for line in (run / f"samples-{kv}.jsonl").read_text().splitlines()]
            assert {r["decode_attention"] for r in records} == {"static"}
            outputs[name, kv] = {r["index"]: (r["raw_output"], r["new_tokens"]) for r in records}
    assert (
        outputs["on", "bf16"] == outputs["off", "bf16"] and outputs["on", "nvfp4"] == outputs["off", "nvfp4"]
    )
    result = CliRunner().invoke(app, [*common[:-2], "--kv-dtype", "nvfp4", "--run-name", "dynamic"])
    assert result.exit_code == 0, result.output
    assert "nvfp4: one batch at a time, not refilled rows: dynamic KV scales" in " ".join(
        result.output.split()
    )
