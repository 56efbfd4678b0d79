"""The lm-eval adapter: ``fp4kv`` in lm-eval's registry, gsm8k equal to ``fp4kv eval gsm8k`` per
sample, loglikelihood through the cache equal to plain ``HFLM`` with bf16 storage, local data,
and ``fp4kv eval lm-eval``'s files and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from fp4kv_cli.cli import app

pytestmark = pytest.mark.filterwarnings("ignore")
cli = CliRunner()
#: A tiny ARC-style dataset for lm-eval's own arc_easy task (multiple choice: loglikelihood).
ARC_ROWS = [
    {"id": "a", "question": "Which is hot?", "choices": {"text": ["ice", "fire", "snow"], "label": ["A", "B", "C"]},
     "answerKey": "B"},
    {"id": "b", "question": "2+2=?", "choices": {"text": ["4", "5"], "label": ["A", "B"]}, "answerKey": "A"},
    {"id": "c", "question": "Sky color?", "choices": {"text": ["blue", "green", "red", "tan"],
                                                      "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
    {"id": "d", "question": "Cats say", "choices": {"text": ["moo", "meow"], "label": ["A", "B"]}, "answerKey": "B"},
]  # fmt: skip


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval_gsm8k(model: str, out: Path, *extra: str) -> dict[str, dict[int, dict]]:
    args = ["eval", "gsm8k", "--model", model, "--kv-dtype", "bf16,nvfp4", "--out", str(out), "--run-name", "g",
            "--no-fidelity", "--device", "cpu", *extra]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    return {
        kv: {r["index"]: r for r in _jsonl(out / "g" / f"samples-{kv}.jsonl")} for kv in ("bf16", "nvfp4")
    }


def _eval_lm_eval(model_args: str, out: Path, tasks: str, *extra: str) -> dict:
    args = ["eval", "lm-eval", "--tasks", tasks, "--model-args", model_args, "--kv-dtype", "bf16,nvfp4",
            "--device", "cpu", "--out", str(out), *extra]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


def _lm_eval_samples(out: Path, kv: str, task: str) -> list[dict]:
    (path,) = out.glob(f"{kv}/*/samples_{task}_*.jsonl")
    return _jsonl(path)


def check_gsm8k_equal(
    model: str, tmp_path: Path, limit: int, fewshot: int, new_tokens: int, **model_args: str
) -> None:
    common = ["--limit", str(limit), "--batch-size", str(limit), "--num-fewshot", str(fewshot)]
    ours = _eval_gsm8k(model, tmp_path / "fp4kv", *common, "--max-new-tokens", str(new_tokens))
    extra = "".join(f",{key}={value}" for key, value in model_args.items())
    summary = _eval_lm_eval(f"pretrained={model}{extra}", tmp_path / "lm", "gsm8k_local", *common,
                            "--gen-kwargs", f"max_gen_toks={new_tokens}")  # fmt: skip
    compared = 0
    for kv in ("bf16", "nvfp4"):
        for sample in _lm_eval_samples(tmp_path / "lm", kv, "gsm8k_local"):
            record = ours[kv][sample["doc_id"]]
            key = "strict" if sample["filter"] == "strict-match" else "flexible"
            assert sample["resps"][0][0] == record["output"]
            assert sample["filtered_resps"][0] == record[key]
            assert bool(sample["exact_match"]) == record[f"{key}_correct"]
            compared += 1
        flags = [ours[kv][i]["strict_correct"] for i in range(limit)]
        assert (
            summary["results"]["gsm8k_local"]["exact_match,strict-match"][kv]["value"] == sum(flags) / limit
        )
    assert compared == 2 * 2 * limit
    assert any(record["output"] for record in ours["nvfp4"].values())
    assert summary["vs_bf16"]["gsm8k_local"]["exact_match,strict-match"]["nvfp4"]["n"] == limit


def test_fp4kv_is_in_lm_evals_registry() -> None:
    from lm_eval.api.registry import get_model

    import fp4kv_cli.evaluate.harness  # noqa: F401
    from fp4kv_cli.evaluate.harness.model import FP4KVLM

    assert get_model("fp4kv") is FP4KVLM and get_model("hf").__name__ == "HFLM"


def test_gsm8k_through_lm_eval_equals_fp4kv_eval(tiny_llama_dir: Path, tmp_path: Path) -> None:
    check_gsm8k_equal(str(tiny_llama_dir), tmp_path, limit=3, fewshot=1, new_tokens=8, max_length=8192)
    (results,) = (tmp_path / "lm").glob("nvfp4/*/results_*.json")
    config = json.loads(results.read_text())["config"]  # lm-eval's own results file
    assert "kv_dtype=nvfp4" in config["model_args"] and config["kv_dtype"] == "nvfp4"


@pytest.mark.slow
def test_gsm8k_through_lm_eval_equals_fp4kv_eval_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    check_gsm8k_equal(str(smollm2_dir), tmp_path, limit=4, fewshot=5, new_tokens=32)


def _arc_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "arc"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ARC_ROWS))
    return folder


def test_loglikelihood_through_the_bf16_cache_equals_plain_hflm(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import lm_eval

    import fp4kv_cli.evaluate.harness  # noqa: F401
    from fp4kv_cli.evaluate.harness.local_tasks import local_task
    from fp4kv_cli.evaluate.harness.run import cached_task_manager

    manager = cached_task_manager()
    task = local_task(manager, "arc_easy", _arc_folder(tmp_path))

    def run(model: str, args: str) -> dict:
        return lm_eval.simple_evaluate(model=model, model_args=f"pretrained={tiny_llama_dir},device=cpu,{args}",
                                       tasks=[task], num_fewshot=1, batch_size=3, task_manager=manager)  # fmt: skip

    # A bf16 model: the bf16 cache then stores K/V exactly as the model wrote them, and the scores
    # are HFLM's to the bit (measured: max difference 0.0). An fp32 model would store 16-bit K/V
    # (rounded: up to 4.6e-4 apart), and fp32 storage differs by 1.9e-6 from reading the context
    # back in chunks instead of HFLM's one forward.
    plain = run("hf", "dtype=bfloat16")
    cached = run("fp4kv", "dtype=bfloat16,kv_dtype=bf16")
    nvfp4 = run("fp4kv", "dtype=bfloat16,kv_dtype=nvfp4")
    name = "arc_easy_local"
    for metric in ("acc,none", "acc_norm,none"):
        assert cached["results"][name][metric] == plain["results"][name][metric]
    rows = {s["doc_id"]: s for s in plain["samples"][name]}
    assert len(rows) == len(ARC_ROWS)
    differs = 0
    for ours, quant in zip(cached["samples"][name], nvfp4["samples"][name]):
        theirs = rows[ours["doc_id"]]
        assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
        for mine, want, q in zip(ours["resps"], theirs["resps"], quant["resps"]):
            assert mine[0] == want[0]  # (log-likelihood, is greedy)
            differs += abs(q[0][0] - want[0][0]) > 5e-3  # nvfp4 storage really changes the scores
    assert differs > 0


def test_cli_runs_a_local_loglikelihood_task(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = _arc_folder(tmp_path)
    summary = _eval_lm_eval(f"pretrained={tiny_llama_dir},dtype=fp32", tmp_path / "out", "arc_easy",
                            "--local-data", f"arc_easy={folder}", "--batch-size", "4")  # fmt: skip
    cells = summary["results"]["arc_easy"]["acc,none"]
    assert set(cells) == {"bf16", "nvfp4"} and all(0 <= c["value"] <= 1 for c in cells.values())
    assert summary["vs_bf16"]["arc_easy"]["acc,none"]["nvfp4"]["n"] == len(ARC_ROWS)
    assert len(_lm_eval_samples(tmp_path / "out", "nvfp4", "arc_easy")) == len(ARC_ROWS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tasks", "no_such_task"], "lm-eval has no task 'no_such_task'"),
        (["--tasks", "gsm8k_local", "--local-data", "x"], "--local-data takes TASK=FOLDER"),
        (["--tasks", "gsm8k_local", "--local-data", "arc_easy=/nonexistent"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line(
    tiny_llama_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    args = [
        "eval",
        "lm-eval",
        "--model-args",
        f"pretrained={tiny_llama_dir}",
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    result = cli.invoke(app, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()
