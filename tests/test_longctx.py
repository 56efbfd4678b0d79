"""``fp4kv eval longctx``: seeded task generation, RULER scoring, and the command end to end."""

from __future__ import annotations

import json
import re
import shutil
from itertools import pairwise
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fp4kv_cli.cli import app
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate import longctx_tasks as tasks
from fp4kv_cli.evaluate import runner
from fp4kv_cli.evaluate.longctx import parse_lengths

cli = CliRunner()


def chars(prompt: str, prefix: str) -> int:
    """Token count of a character-level tokenizer (the tiny test models')."""
    return len(prompt + prefix)


def test_samples_are_deterministic_by_seed() -> None:
    for task in tasks.TASKS:
        a = tasks.make_sample(task, 2000, 3, seed=7, count_tokens=chars)
        assert a == tasks.make_sample(task, 2000, 3, seed=7, count_tokens=chars)
        assert a.prompt != tasks.make_sample(task, 2000, 3, seed=8, count_tokens=chars).prompt
        assert a.prompt != tasks.make_sample(task, 2000, 4, seed=7, count_tokens=chars).prompt
    # Pinned: the first sample of seed 0 on every machine (the shipped GSM8K text and str seeding).
    first = tasks.make_sample("passkey", 1000, 0, seed=0, count_tokens=chars)
    assert first.references == ("11203",)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_samples_fill_their_length_and_hold_the_needles(task: str) -> None:
    for length in (600, 3000):
        sample = tasks.make_sample(task, length, 0, seed=0, count_tokens=chars)
        size = chars(sample.prompt, sample.answer_prefix)
        assert (1 - tasks.SLACK) * length - 200 <= size <= length  # 200: at most one filler sentence
        for ref in sample.references:
            assert ref in sample.prompt
        assert all(0 <= d <= 1 for d in sample.depths) and list(sample.depths) == sorted(sample.depths)


def test_needles_and_answers_of_each_task() -> None:
    single = tasks.make_sample("niah_single", 3000, 1, 0, chars)
    (value,) = single.references
    key = re.search(r"magic number for (\w+) mentioned", single.prompt).group(1)
    assert f"One of the special magic numbers for {key} is: {value}." in single.prompt
    multi = tasks.make_sample("niah_multikey", 3000, 1, 0, chars)
    needles = re.findall(r"special magic numbers for (\w+) is: (\d{7})\.", multi.prompt)
    asked = re.search(r"magic number for (\w+) mentioned", multi.prompt).group(1)
    assert len({k for k, _ in needles}) == tasks.MULTIKEY_NEEDLES
    assert dict(needles)[asked] == multi.references[0]
    chain = tasks.make_sample("variable_tracking", 3000, 1, 0, chars)
    names = list(chain.references)
    assert len(set(names)) == tasks.CHAIN_LENGTH
    positions = [chain.prompt.index(f"VAR {names[0]} = ")] + [
        chain.prompt.index(f"VAR {b} = VAR {a}.") for a, b in pairwise(names)
    ]
    assert positions == sorted(positions)  # assignments appear in chain order
    passkey = tasks.make_sample("passkey", 3000, 1, 0, chars)
    assert f"The pass key is {passkey.references[0]}. Remember it." in passkey.prompt


def test_filler_is_gsm8k_text_without_annotations() -> None:
    sentences = tasks.filler_sentences()
    assert len(sentences) > 10_000
    assert not any("<<" in s or s.startswith("####") for s in sentences[:2000])


def test_scoring_is_string_match_all() -> None:
    assert tasks.score(" 1234567.", ["1234567"]) == 1.0
    assert tasks.score("it is 123456", ["1234567"]) == 0.0
    assert tasks.score("abcde, FGHIJ and klmno", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"]) == 0.75


def test_parsing_lengths_and_tasks() -> None:
    assert parse_lengths("8k, 4096,4k") == (4096, 8192)
    assert tasks.parse_tasks("passkey, niah_single,passkey") == ("passkey", "niah_single")
    for bad in ("", "4q", "-3"):
        with pytest.raises(FP4KVError, match="--lengths"):
            parse_lengths(bad)
    with pytest.raises(FP4KVError, match="unknown long-context task ruler"):
        tasks.parse_tasks("ruler")
    with pytest.raises(FP4KVError, match="needs .* tokens without filler"):
        tasks.make_sample("niah_single", 100, 0, 0, chars)


def _long_tiny(tiny_llama_dir: Path, tmp_path: Path, maximum: int) -> Path:
    """The tiny Llama with ``maximum`` positions (rotary: no weights depend on it): its
    character tokenizer needs ~520 tokens for a multi-key prompt without filler."""
    folder = tmp_path / "tiny-long"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": maximum}))
    return folder


@pytest.mark.slow
def test_longctx_end_to_end(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two samples per task at 768 tokens (the tiny model's maximum here, so 1024 is skipped),
    bf16 and nvfp4, prefilled in chunks; batches run by ``eval gsm8k``'s :func:`run_batch`, which
    measures peak memory on the model's input device."""
    model = _long_tiny(tiny_llama_dir, tmp_path, 768)
    asked = []
    monkeypatch.setattr(runner, "input_device", lambda m, real=runner.input_device: asked.append(m) or real(m))
    args = ["eval", "longctx", "--model", str(model), "--kv-dtype", "bf16,nvfp4", "--lengths", "768,1024",
            "--limit", "2", "--max-new-tokens", "8", "--prefill-chunk", "2048", "--device", "cpu",
            "--out", str(tmp_path), "--run-name", "r"]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Δ vs bf16" in result.output and "skipped lengths" in result.output
    assert len(asked) == 2  # one run_batch per format: its 8 samples in one batch on the CPU
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lengths"] == [768] and summary["skipped_lengths"] == [1024]
    nvfp4 = summary["results"]["nvfp4"]["lengths"]["768"]
    assert nvfp4["accuracy"]["n"] == 8 and nvfp4["vs_bf16"]["n"] == 8
    assert nvfp4["kv_bytes_per_sequence"] == 72 * 768  # 72 bytes per token (see test_eval_cli)
    assert summary["results"]["bf16"]["lengths"]["768"]["kv_bytes_per_sequence"] == 256 * 768
    assert nvfp4["prefill_row_chunk"] < nvfp4["mean_prompt_tokens"]  # the prompts went in chunks
    records = [json.loads(line) for line in (run / "samples-nvfp4.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["index"]) for r in records) == sorted(
        (t, i) for t in tasks.TASKS for i in (0, 1)
    )
    assert all(r["prompt_tokens"] <= 768 - 8 and r["score"] in (0.0, 0.25, 0.5, 0.75, 1.0) for r in records)
    assert (run / "summary.png").read_bytes()[:4] == b"\x89PNG"
    again = cli.invoke(app, args)
    assert again.exit_code == 2 and "holds an earlier run" in again.output


def test_lengths_above_the_maximum_are_an_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = cli.invoke(app, ["eval", "longctx", "--model", str(tiny_llama_dir), "--lengths", "4k",
                              "--device", "cpu", "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith("error: every --lengths is above the model's maximum")
    )
    assert not any(tmp_path.iterdir())
