"""GSM8K prompt and scoring (lm-eval gsm8k v3.0 rules), metrics, and the resumable sample log."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate import gsm8k
from fp4kv_cli.evaluate.metrics import accuracy, paired_difference, wilson_interval
from fp4kv_cli.evaluate.results import SampleLog, prepare_run_dir

GOLD = "He pays 1,000 + 234 = <<1000+234=1234>>1,234 dollars.\n#### 1,234"


def test_fewshot_prompt_is_lm_eval_format() -> None:
    shots = [{"question": "Q1?", "answer": "A1\n#### 1"}, {"question": "Q2?", "answer": "A2\n#### 2"}]
    assert gsm8k.fewshot_prompt("Q?", shots) == (
        "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer: A2\n#### 2\n\nQuestion: Q?\nAnswer:"
    )
    assert gsm8k.fewshot_prompt("Q?", []) == "Question: Q?\nAnswer:"


def test_fewshot_draws_follow_lm_eval_sampler() -> None:
    docs = [{"question": f"q{i}"} for i in range(50)]
    rnd = random.Random(1234)  # lm-eval: one Random(fewshot seed), rnd.sample(docs, k) per test doc in order
    expected = [[docs.index(d) for d in rnd.sample(docs, 5)] for _ in range(4)]
    assert gsm8k.fewshot_draws(4, len(docs), 5) == expected
    assert gsm8k.fewshot_draws(2, len(docs), 5) == expected[:2]  # --limit keeps the first draws
    assert len(set(map(tuple, expected))) == 4
    assert gsm8k.fewshot_draws(3, len(docs), 0) == [[], [], []]


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("So 1000+234=1234.\n#### 1,234", "1,234", "1,234"),
        ("It costs $1,234.", "[invalid]", "$1,234."),
        ("He lost 5 and has -3 left\n#### -3", "-3", "-3"),
        ("#### 2.50 dollars", "2.50", "2.50"),
        ("The answer is 18.", "[invalid]", "18."),
        ("####18", "[invalid]", "18"),
        ("no number here", "[invalid]", "[invalid]"),
        ("#### 7 and later #### 9", "7", "9"),
        ("3 apples and 5 pears make 8", "[invalid]", "8"),
    ],
)
def test_extraction_matches_lm_eval_filters(text: str, strict: str, flexible: str) -> None:
    assert gsm8k.extract_strict(text) == strict
    assert gsm8k.extract_flexible(text) == flexible


@pytest.mark.parametrize(
    ("extracted", "answer", "correct"),
    [
        ("1,234", GOLD, True),  # commas ignored
        ("$1234", GOLD, True),  # dollar ignored
        ("1234.", GOLD, True),  # one trailing period ignored
        ("1234.0", GOLD, False),  # exact string match, not numeric equality (as lm-eval)
        ("-3", "x\n#### -3", True),
        ("3", "x\n#### -3", False),
        ("2.50", "x\n#### 2.5", False),
        ("[invalid]", GOLD, False),
    ],
)
def test_exact_match_normalisation(extracted: str, answer: str, correct: bool) -> None:
    assert gsm8k.is_correct(extracted, answer) is correct


def test_gold_is_text_after_hashes() -> None:
    assert gsm8k.gold_answer(GOLD) == "1234"
    assert gsm8k.gold_answer("a\n#### b\n#### $5.") == "5"


def test_cut_at_stop_keeps_text_before_first_stop() -> None:
    stops = gsm8k.STOP_SEQUENCES
    assert gsm8k.cut_at_stop(" 5 + 3 = 8\n#### 8\n\nQuestion: next", stops) == " 5 + 3 = 8\n#### 8\n\n"
    assert gsm8k.cut_at_stop("#### 4<|im_end|>junk", stops) == "#### 4"
    assert gsm8k.cut_at_stop("#### 4", stops) == "#### 4"


def test_accuracy_with_known_numbers() -> None:
    result = accuracy([True, True, False, False])
    assert (result.n, result.correct, result.mean) == (4, 2, 0.5)
    assert result.stderr == pytest.approx((0.25 * 4 / 3) ** 0.5 / 2)  # lm-eval's sample stderr
    assert result.ci95 == pytest.approx((0.15003, 0.84997), abs=1e-5)  # Wilson, 2 of 4
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)
    assert accuracy([True]).stderr is None
    with pytest.raises(ValueError):
        accuracy([])


def test_paired_difference_with_known_numbers() -> None:
    diff = paired_difference([True, True, False, True], [True, False, False, False])
    assert (diff.n, diff.mean, diff.a_only, diff.b_only) == (4, 0.5, 2, 0)
    half = 1.959964 * (1 / 3) ** 0.5 / 2
    assert diff.ci95 == pytest.approx((0.5 - half, 0.5 + half), abs=1e-5)
    same = paired_difference([True, False], [True, False])
    assert same.mean == 0 and same.ci95 == (0.0, 0.0)
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_sample_log_drops_a_truncated_last_line(tmp_path: Path) -> None:
    log = SampleLog(tmp_path / "samples-bf16.jsonl")
    log.append([{"index": 3, "x": 1}, {"index": 0, "x": 2}])
    with log.path.open("a") as handle:
        handle.write('{"index": 5, "x"')  # killed mid-write
    assert sorted(log.load()) == [0, 3]
    log.append([{"index": 5, "x": 3}])
    assert [json.loads(line)["index"] for line in log.path.read_text().splitlines()] == [3, 0, 5]


def test_sample_log_rejects_a_corrupt_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "samples-bf16.jsonl"
    path.write_text('{"index": 0}\nnot json\n{"index": 1}\n')
    with pytest.raises(FP4KVError, match=":2 is not valid JSON"):
        SampleLog(path).load()


def test_run_dir_resume_rules(tmp_path: Path) -> None:
    config = {"model": "m", "limit": 4, "batch_size": 2}
    run_dir = prepare_run_dir(tmp_path, "run", config, resume=False)
    assert json.loads((run_dir / "config.json").read_text()) == config
    with pytest.raises(FP4KVError, match="pass --resume"):
        prepare_run_dir(tmp_path, "run", config, resume=False)
    prepare_run_dir(tmp_path, "run", {**config, "batch_size": 8}, resume=True)  # batch size may change
    with pytest.raises(FP4KVError, match="limit differ"):
        prepare_run_dir(tmp_path, "run", {**config, "limit": 5}, resume=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FP4KVError, match="is not a folder"):
        prepare_run_dir(blocker, "run", config, resume=False)
