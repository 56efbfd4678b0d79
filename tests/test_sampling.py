"""The sampled protocol: counter-based noise, the sampler's distribution, the same tokens on
every decode path, reproducible runs, K=1 at T->0 equal to greedy, and the per-question CI math."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch
from typer.testing import CliRunner

from fp4kv_cli import fused_attention
from fp4kv_cli.cli import app
from fp4kv_cli.evaluate.metrics import Z80, Z95, sampled_accuracy, sampled_paired_difference
from fp4kv_cli.evaluate.sampling import SamplingSpec, hash32, row_keys, sample_next, uniforms

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
cli = CliRunner()
FAST = ["--num-fewshot", "0", "--max-new-tokens", "8", "--device", "cpu", "--no-fidelity"]


def test_hash_is_the_reference_lowbias32() -> None:
    def reference(x: int) -> int:  # Wellons' lowbias32 on Python ints
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    assert hash32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_uniforms_depend_only_on_key_step_and_token() -> None:
    keys = row_keys(7, [0, 1, 2], [0, 0, 1])
    vocab = torch.arange(1000)
    u = uniforms(keys, 3, vocab)
    assert u.shape == (3, 1000) and bool(((u > 0) & (u < 1)).all())
    assert abs(float(u.mean()) - 0.5) < 0.02
    assert torch.equal(uniforms(keys[1:2], torch.tensor([3]), vocab), u[1:2])  # no batch dependence
    picked = torch.tensor([[5, 900], [7, 1], [0, 999]])
    assert torch.equal(uniforms(keys, 3, picked), u.gather(1, picked))  # a token's noise, wherever it sits
    assert not torch.equal(uniforms(keys, 4, vocab), u)
    assert len(set(row_keys(7, [0, 0, 1], [0, 1, 0]).tolist())) == 3
    assert not torch.equal(row_keys(8, [0], [0]), row_keys(7, [0], [0]))


def test_sampler_draws_the_tempered_nucleus_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    rows = 20000
    keys = row_keys(0, range(rows), [0] * rows)
    spec = SamplingSpec(temperature=0.7)
    drawn = sample_next(logits.expand(rows, -1), keys, 0, spec)
    frequency = torch.bincount(drawn, minlength=5).double() / rows
    expected = torch.softmax(logits.double() / 0.7, -1)
    assert torch.allclose(frequency, expected, atol=4 * math.sqrt(0.25 / rows))
    nucleus = sample_next(logits.expand(rows, -1), keys, 0, SamplingSpec(temperature=0.7, top_p=0.8))
    mass = torch.softmax(logits / 0.7, -1)  # 0.73, 0.18, ...: the top two hold 0.8
    assert mass[0] < 0.8 < mass[0] + mass[1]
    assert set(nucleus.tolist()) == {0, 1}
    assert abs(float((nucleus == 0).double().mean()) - float(mass[0] / mass[:2].sum())) < 0.02
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    cold = sample_next(logits, row_keys(3, range(64), [0] * 64), 5, SamplingSpec(1e-6))
    assert torch.equal(cold, logits.argmax(-1))


def test_sampled_static_decode_equals_sampled_generate(
    tiny_llama_dir: Path, interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph step (eager on CPU) draws the tokens ``generate`` draws with the same sampler."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    check_sampled_paths_agree(tiny_llama_dir, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sampled_cuda_graph_decode_equals_sampled_generate(tiny_llama_dir: Path) -> None:
    check_sampled_paths_agree(tiny_llama_dir, "cuda")


def check_sampled_paths_agree(tiny_llama_dir: Path, device: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fp4kv_cli.cache import QuantKVCache
    from fp4kv_cli.evaluate.generate import generate_tokens, greedy_config
    from fp4kv_cli.evaluate.sampling import RowSampler
    from fp4kv_cli.quant.registry import get_kv_cache_method

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = tokenizer.unk_token
    prompts = [tokenizer(text).input_ids for text in ("Q: 2+3?", "Hi", "7*8=")]
    config = greedy_config(model, tokenizer, 6, [])
    sampler = RowSampler(
        SamplingSpec(temperature=1.0, top_p=0.9, seed=5), row_keys(5, [0, 1, 2], [0, 0, 0], device)
    )

    last: list = []

    def run(decode: str) -> tuple[torch.Tensor, torch.Tensor]:
        cache = QuantKVCache.for_model(model.config, get_kv_cache_method("blockfp4"), capacity_hint=16)
        last[:] = [cache]
        return generate_tokens(model, tokenizer, prompts, cache, config, decode, sampler=sampler)

    static, static_counts = run("graph")
    assert fused_attention.decode_read(last[0]) == ("graph" if device == "cuda" else "static")
    eager, eager_counts = run("fused")  # generate with the same kernel, a logits processor samples
    assert torch.equal(static_counts, eager_counts) and int(static_counts.max()) > 1
    for row, count in enumerate(static_counts.tolist()):
        assert static[row, :count].tolist() == eager[row, :count].tolist()
    greedy = generate_tokens(model, tokenizer, prompts, QuantKVCache.for_model(
        model.config, get_kv_cache_method("blockfp4"), capacity_hint=16), config, "gather")[0]  # fmt: skip
    assert not torch.equal(greedy, eager)  # T=1 sampling is not greedy


def _run(folder: Path, out: Path, name: str, *extra: str) -> dict:
    args = ["eval", "gsm8k", "--model", str(folder), "--kv-dtype", "bf16,nvfp4", "--limit", "3",
            "--out", str(out), "--run-name", name, *FAST, *extra]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / name / "summary.json").read_text())


def _outputs(run: Path, kv: str) -> dict[tuple[int, int], str]:
    lines = [json.loads(line) for line in (run / f"samples-{kv}.jsonl").read_text().splitlines()]
    return {(r["index"], r.get("sample", 0)): r["raw_output"] for r in lines}


def test_sampled_runs_reproduce_and_t0_is_greedy(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sampled = ["--samples", "2", "--temperature", "0.9", "--top-p", "0.95", "--seed", "3"]
    first = _run(tiny_llama_dir, tmp_path, "a", "--batch-size", "6", *sampled)
    _run(tiny_llama_dir, tmp_path, "b", "--batch-size", "2", *sampled)  # other batches, same tokens
    _run(tiny_llama_dir, tmp_path, "c", "--batch-size", "6", *sampled[:-1], "4")
    for kv in ("bf16", "nvfp4"):
        a = _outputs(tmp_path / "a", kv)
        assert sorted(a) == [(i, k) for i in range(3) for k in range(2)]
        assert a == _outputs(tmp_path / "b", kv)
        assert a != _outputs(tmp_path / "c", kv)  # another seed draws other tokens
    assert first["decoding"] == {
        "mode": "sampled",
        "samples": 2,
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 3,
    }
    assert first["results"]["nvfp4"]["accuracy"]["strict"]["samples"] == 2
    assert set(first["results"]["nvfp4"]["vs_bf16"]["strict"]) >= {"mean", "ci95", "mdd80"}
    _run(tiny_llama_dir, tmp_path, "greedy", "--batch-size", "3")
    _run(tiny_llama_dir, tmp_path, "cold", "--batch-size", "3", "--samples", "1", "--temperature", "1e-7")
    for kv in ("bf16", "nvfp4"):
        greedy, cold = _outputs(tmp_path / "greedy", kv), _outputs(tmp_path / "cold", kv)
        assert greedy == cold and any(greedy.values())


def test_resume_adds_samples(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sampled = ["--temperature", "0.9", "--batch-size", "4"]
    _run(tiny_llama_dir, tmp_path, "r", "--samples", "1", *sampled)
    one = _outputs(tmp_path / "r", "nvfp4")
    summary = _run(tiny_llama_dir, tmp_path, "r", "--samples", "2", "--resume", *sampled)
    two = _outputs(tmp_path / "r", "nvfp4")
    assert len(two) == 6 and all(two[key] == text for key, text in one.items())
    assert summary["results"]["nvfp4"]["accuracy"]["strict"]["samples"] == 2
    result = cli.invoke(app, ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "nvfp4",
                              "--limit", "3", "--out", str(tmp_path), "--run-name", "r", "--resume", *FAST,
                              "--samples", "2", "--temperature", "0.5"])  # fmt: skip
    assert result.exit_code == 2 and "temperature differ" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--samples", "4"], "need --temperature > 0"),
        (["--samples", "0", "--temperature", "1"], "--samples must be > 0"),
        (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--engine", "vllm", "--temperature", "0.6"], "are for --engine fp4kv"),
    ],
)
def test_bad_sampling_options(tiny_llama_dir: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    result = cli.invoke(
        app, ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--out", str(tmp_path), *extra]
    )
    assert result.exit_code == 2 and message in result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / f"{tiny_llama_dir.name}-gsm8k").exists()


def test_ci_math_on_a_constructed_example() -> None:
    # 4 questions x 2 samples. Per-question fractions a = (1, .5, 0, 1), b = (.5, .5, 0, 0).
    a = [[True, True], [True, False], [False, False], [True, True]]
    b = [[True, False], [False, True], [False, False], [False, False]]
    acc = sampled_accuracy(a)
    assert (acc.n, acc.samples, acc.mean) == (4, 2, 0.625)
    sd = math.sqrt(((1 - 0.625) ** 2 * 2 + (0.5 - 0.625) ** 2 + 0.625**2) / 3)
    assert acc.stderr == pytest.approx(sd / 2)
    assert acc.ci95 == pytest.approx((0.625 - Z95 * sd / 2, 0.625 + Z95 * sd / 2))
    diff = sampled_paired_difference(a, b)  # d = (.5, 0, 0, 1): mean .375
    sd_d = math.sqrt(((0.5 - 0.375) ** 2 + 0.375**2 * 2 + 0.625**2) / 3)
    assert (diff.n, diff.mean, diff.a_only, diff.b_only) == (4, 0.375, 2, 0)
    assert diff.ci95 == pytest.approx((0.375 - Z95 * sd_d / 2, 0.375 + Z95 * sd_d / 2))
    assert diff.mdd80 == pytest.approx((1.959964 + 0.841621) * sd_d / 2, rel=1e-5)
    assert Z80 == pytest.approx(0.841621, rel=1e-5)
    with pytest.raises(ValueError):
        sampled_accuracy([[True], [True, False]])


def test_sample_plan_splits_the_variance() -> None:
    from fp4kv_cli.evaluate.metrics import sample_plan

    # d_ik: question 0 (1, 1), question 1 (0, 0), question 2 (-1, -1), question 3 (1, 0).
    a = [[True, True], [False, False], [False, False], [True, False]]
    b = [[False, False], [False, False], [True, True], [False, False]]
    plan = sample_plan(a, b, half_widths=(1.0, 0.1))
    within = (0 + 0 + 0 + 0.5) / 4  # per-question sample variances (k - 1 = 1)
    means = [1, 0, -1, 0.5]
    between = sum((m - 0.125) ** 2 for m in means) / 3 - within / 2
    assert (plan.within, plan.between) == (pytest.approx(within), pytest.approx(between))
    room = (1.0 / Z95) ** 2 * 4 - between
    assert plan.samples_for == {"1": math.ceil(within / room), "0.1": None}  # 0.1: between alone is wider
    assert sample_plan([[True]] * 3, [[False]] * 3) is None
