"""Placement by accelerate (``--device-map`` / ``--max-memory``): a model split across devices
(here CPU and disk offload, plus CPU and GPU where CUDA exists) calibrates to the same amax and
generates the same answers as the model on one device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fp4kv_cli.calibration.calibrate import calibrate
from fp4kv_cli.cli import app
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.models import input_device, load_model_and_tokenizer, parse_max_memory, placed_devices

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Numbers: 1 2 3 4 5 6 7 8 9 10", "short"]
#: Small enough that accelerate keeps the embeddings and a layer or so in RAM and offloads the
#: rest of the tiny Llama to disk (its weights are ~300 KB in fp32).
OFFLOAD = {"cpu": "120KB"}
cli = CliRunner()


def test_parse_max_memory() -> None:
    assert parse_max_memory("0=20GiB, 1=18GiB,cpu=64GiB") == {0: "20GiB", 1: "18GiB", "cpu": "64GiB"}
    assert parse_max_memory(None) is None and parse_max_memory("") is None
    for bad in ("20GiB", "gpu=1GiB", "0="):
        with pytest.raises(FP4KVError, match="DEVICE=SIZE"):
            parse_max_memory(bad)


def test_placement_options_are_checked(tiny_llama_dir: Path) -> None:
    with pytest.raises(FP4KVError, match="--max-memory needs --device-map"):
        load_model_and_tokenizer(str(tiny_llama_dir), "cpu", "fp32", max_memory="cpu=1GiB")
    with pytest.raises(FP4KVError, match="unknown --device-map"):
        load_model_and_tokenizer(str(tiny_llama_dir), "cpu", "fp32", device_map="everywhere")


def _amax(data: dict) -> list[tuple[float, float, list[float]]]:
    return [(layer["k_amax"], layer["v_amax"], layer["k_amax_per_head"]) for layer in data["layers"]]


def test_offloaded_calibration_equals_single_device(tiny_llama_dir: Path) -> None:
    single, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), "cpu", "fp32")
    placed, _ = load_model_and_tokenizer(
        str(tiny_llama_dir), "cpu", "fp32", device_map="sequential", max_memory=OFFLOAD
    )
    assert "disk" in placed_devices(placed) and input_device(placed) == torch.device("cpu")
    kwargs = dict(seq_len=32, batch_size=2, per_head=True, center_k=True)
    expected = calibrate(single, tokenizer, TEXTS, **kwargs)
    got = calibrate(placed, tokenizer, TEXTS, **kwargs)
    assert _amax(got) == _amax(expected)
    assert [layer["k_offset"] for layer in got["layers"]] == [layer["k_offset"] for layer in expected["layers"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_gpu_split_calibration_matches_gpu(tiny_llama_dir: Path) -> None:
    single, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), "cuda", "fp32")
    placed, _ = load_model_and_tokenizer(str(tiny_llama_dir), "cuda", "fp32", device_map="sequential",
                                         max_memory={0: "150KB", "cpu": "1GiB"})  # fmt: skip
    assert len(placed_devices(placed)) > 1
    expected = calibrate(single, tokenizer, TEXTS, seq_len=32, batch_size=2)
    got = calibrate(placed, tokenizer, TEXTS, seq_len=32, batch_size=2)
    for e, g in zip(_amax(expected), _amax(got)):
        assert g[0] == pytest.approx(e[0], rel=1e-6) and g[1] == pytest.approx(e[1], rel=1e-6)


def test_offloaded_eval_answers_equal_single_device(tiny_llama_dir: Path, tmp_path: Path) -> None:
    common = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "bf16,nvfp4", "--limit", "2",
              "--num-fewshot", "1", "--max-new-tokens", "8", "--no-fidelity", "--out", str(tmp_path)]  # fmt: skip
    runs = {"single": [], "placed": ["--device-map", "sequential", "--max-memory", "cpu=120KB"]}
    answers = {}
    for name, extra in runs.items():
        result = cli.invoke(app, [*common, "--run-name", name, *extra])
        assert result.exit_code == 0, result.output
        for kv in ("bf16", "nvfp4"):
            rows = (tmp_path / name / f"samples-{kv}.jsonl").read_text().splitlines()
            answers[name, kv] = [json.loads(row)["raw_output"] for row in rows]
    resumed = cli.invoke(app, [*common, "--run-name", "placed", "--resume", *runs["placed"]])
    placed_line = next(line for line in resumed.output.splitlines() if line.startswith("placed on"))
    assert "disk" in placed_line
    for kv in ("bf16", "nvfp4"):
        assert answers["placed", kv] == answers["single", kv]
