"""``fp4kv eval gsm8k`` end to end: results files, resume after a kill, and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fp4kv_cli.cli import app
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate import runner as eval_runner
from fp4kv_cli.evaluate.results import prepare_run_dir
from fp4kv_cli.quant.scales import config_hash

cli = CliRunner()
FAST = ["--num-fewshot", "1", "--max-new-tokens", "8", "--device", "cpu"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_side_by_side_results(tiny_llama_dir: Path, tmp_path: Path) -> None:
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "bf16,fp8,nvfp4,blockfp4",
            "--limit", "3", "--batch-size", "2", "--fidelity-samples", "1", "--out", str(tmp_path),
            "--run-name", "r", *FAST]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "blockfp4" in result.output and "Δ strict" in result.output
    run = tmp_path / "r"
    summary = json.loads((run / "summary.json").read_text())
    results = summary["results"]
    assert list(results) == ["bf16", "fp8", "nvfp4", "blockfp4"]
    # 2 layers x (K, V) x 2 KV heads x (16/2 + 16/16) bytes; a bf16 cache holds 2 x 16 bytes per head.
    assert results["nvfp4"]["kv_bytes_per_token"] == 72 and summary["bf16_kv_bytes_per_token"] == 256
    assert results["nvfp4"]["kv_bytes_per_token_vs_bf16"] == 0.28125
    assert results["fp8"]["kv_bytes_per_token_vs_bf16"] == 0.5
    assert results["nvfp4"]["scale_source"] == "dynamic" and results["blockfp4"]["scale_source"] == "none"
    assert results["bf16"]["fidelity"]["kl"] == 0.0 and results["bf16"]["fidelity"]["top1"] == 1.0
    assert results["nvfp4"]["fidelity"]["kl"] > 0 and len(results["nvfp4"]["fidelity"]["k_rel_error"]) == 2
    assert results["bf16"]["vs_bf16"] is None and results["nvfp4"]["vs_bf16"]["strict"]["n"] == 3
    for kv in results:
        records = _lines(run / f"samples-{kv}.jsonl")
        assert sorted(r["index"] for r in records) == [0, 1, 2]
        assert {"question", "gold", "output", "strict", "flexible", "strict_correct"} <= set(records[0])
    assert (run / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["prefill_chunk"] == 16384 and results["nvfp4"]["batch_size"] == 2


def test_default_batch_and_chunked_prefill_on_cpu(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """No --batch-size off CUDA: the fixed default (capped by the questions); a small
    --prefill-chunk writes the prompts in chunks (recorded per sample)."""
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "nvfp4", "--limit", "3",
            "--no-fidelity", "--prefill-chunk", "96", "--out", str(tmp_path), "--run-name", "r", *FAST]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    nvfp4 = summary["results"]["nvfp4"]
    assert summary["batch_size"] == "auto" and nvfp4["batch_size"] == 3
    assert nvfp4["auto_batch"]["free_bytes"] is None
    records = _lines(tmp_path / "r" / "samples-nvfp4.jsonl")
    assert {r["prefill_row_chunk"] for r in records} == {32} and min(r["prompt_tokens"] for r in records) > 32


def test_resume_after_a_killed_run(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "nvfp4", "--limit", "4",
            "--batch-size", "2", "--no-fidelity", "--out", str(tmp_path), "--run-name", "r", *FAST]  # fmt: skip
    real = eval_runner.generate_batch
    calls: list[int] = []

    def killed_after_one_batch(model, tokenizer, prompt_ids, *rest):  # type: ignore[no-untyped-def]
        if calls:
            raise KeyboardInterrupt
        calls.append(len(prompt_ids))
        return real(model, tokenizer, prompt_ids, *rest)

    monkeypatch.setattr(eval_runner, "generate_batch", killed_after_one_batch)
    assert cli.invoke(app, args).exit_code != 0
    log = tmp_path / "r" / "samples-nvfp4.jsonl"
    first = _lines(log)
    assert len(first) == 2 and not (tmp_path / "r" / "summary.json").exists()
    with log.open("a") as handle:
        handle.write('{"index": 9, "question": "cut sho')  # a write cut short by the kill

    again = cli.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output

    def counting(model, tokenizer, prompt_ids, *rest):  # type: ignore[no-untyped-def]
        calls.append(len(prompt_ids))
        return real(model, tokenizer, prompt_ids, *rest)

    monkeypatch.setattr(eval_runner, "generate_batch", counting)
    calls.clear()
    resumed = cli.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert calls == [2]  # only the unfinished batch ran
    records = _lines(log)
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3]
    assert records[:2] == first
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["results"]["nvfp4"]["accuracy"]["strict"]["n"] == 4


def test_resume_refuses_another_decode_read(tmp_path: Path) -> None:
    """One run's samples come from one decode read; a config.json from before the option existed
    was the gather read."""
    config = {"model": "m", "decode_attention": "fused"}
    prepare_run_dir(tmp_path, "r", config, resume=False)
    with pytest.raises(FP4KVError, match="decode_attention differ"):
        prepare_run_dir(tmp_path, "r", {**config, "decode_attention": "graph"}, resume=True)
    (tmp_path / "r" / "config.json").write_text(json.dumps({"model": "m"}))
    prepare_run_dir(tmp_path, "r", {"model": "m", "decode_attention": "gather"}, resume=True)
    (tmp_path / "r" / "config.json").write_text(json.dumps({"model": "m"}))
    with pytest.raises(FP4KVError, match="decode_attention differ"):
        prepare_run_dir(tmp_path, "r", config, resume=True)


def test_calibrated_scales_and_k_offsets_are_used(tiny_llama_dir: Path, tmp_path: Path) -> None:
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
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "bf16,nvfp4", "--limit", "2",
            "--scales", str(tmp_path / "scales.json"), "--fidelity-samples", "1", "--out", str(tmp_path),
            "--run-name", "c", *FAST]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    nvfp4 = summary["results"]["nvfp4"]
    assert nvfp4["scale_source"] == "calibrated" and nvfp4["k_centering"] is True
    assert summary["results"]["bf16"]["k_centering"] is False
    assert "calibrated +center" in result.output


def _scales_for_three_layers(path: Path) -> Path:
    layer = {"k_amax": 4.0, "v_amax": 2.0}
    data = {"schema": "fp4kv.scales", "version": 1, "layers": [{"index": i, **layer} for i in range(3)]}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--kv-dtype", "bf16,int3"], "unknown KV cache dtype 'int3'"),
        (["--limit", "0"], "--limit must be > 0"),
        (["--decode-attention", "paged"], "--decode-attention must be one of graph, fused, gather"),
        (["--prefill-chunk", "0"], "--prefill-chunk must be > 0"),
        (["--chat"], "has no chat template"),
        (["--scales", "SCALES"], "scales file has 3 layers but the model has 2"),
        (["--out", "BLOCKED"], "is not a folder"),
        (["--data", "MISSING"], "does not exist"),
    ],
)
def test_bad_input_is_a_one_line_error(
    tiny_llama_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    replace = {"SCALES": str(_scales_for_three_layers(tmp_path / "s.json")), "BLOCKED": str(blocked),
               "MISSING": str(tmp_path / "none.jsonl")}  # fmt: skip
    extra = [replace.get(a, a) for a in extra]
    args = [
        "eval",
        "gsm8k",
        "--model",
        str(tiny_llama_dir),
        "--out",
        str(tmp_path / "out"),
        "--limit",
        "2",
        *FAST,
    ]
    result = cli.invoke(app, [*args, *extra])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.output
    assert "Traceback" not in result.output


def test_fp4_needs_head_dim_multiple_of_16(tmp_path: Path) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 96, "head_dim": 24, "vocab_size": 100}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = cli.invoke(
        app, ["eval", "gsm8k", "--model", str(tmp_path), "--kv-dtype", "nvfp4", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "head_dim divisible by 16, got 24" in result.output


@pytest.mark.slow
def test_smollm2_gguf_end_to_end(smollm2_gguf: Path, tmp_path: Path) -> None:
    args = ["eval", "gsm8k", "--model", str(smollm2_gguf), "--kv-dtype", "bf16,nvfp4", "--limit", "4",
            "--batch-size", "4", "--num-fewshot", "1", "--max-new-tokens", "24", "--fidelity-samples", "1",
            "--device", "cpu", "--out", str(tmp_path), "--run-name", "smol"]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "smol" / "summary.json").read_text())
    nvfp4 = summary["results"]["nvfp4"]
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64 -> (32 + 4) * 3 * 30 * 2 bytes per token.
    assert nvfp4["kv_bytes_per_token"] == 6480 and nvfp4["kv_bytes_per_token_vs_bf16"] == 0.28125
    assert 0 < nvfp4["fidelity"]["kl"] < 1 and nvfp4["fidelity"]["top1"] > 0.5
    assert max(nvfp4["fidelity"]["k_rel_error"]) < 0.3
    records = _lines(tmp_path / "smol" / "samples-nvfp4.jsonl")
    assert len(records) == 4 and sum(r["new_tokens"] for r in records) > 0
    assert all((r["new_tokens"] == 0) == (r["raw_output"] == "") for r in records)
    assert all("Question:" not in r["output"] for r in records)
