"""`fp4kv methods`: the formats table for a model's KV shape, and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fp4kv_cli.cli import app

runner = CliRunner()


def test_methods_default_shape_lists_every_format() -> None:
    result = runner.invoke(app, ["methods", "--mem-gib", "1"])
    assert result.exit_code == 0, result.output
    for name in ("bf16", "fp8", "nvfp4", "blockfp4"):
        assert name in result.output
    assert "8,064" in result.output  # Qwen2.5-1.5B shape, NVFP4 bytes per token
    assert "0.2812x" in result.output


def test_methods_reads_a_model_folder_config(tmp_path: Path) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "hidden_size": 576}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["methods", "--model", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # head_dim 64: nvfp4 = (32 + 4) * 3 heads * 30 layers * 2 = 6480 bytes per token.
    assert "6,480" in result.output and "23,040" in result.output


def test_methods_bad_model_is_one_line_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["methods", "--model", str(tmp_path / "missing.gguf")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "does not exist" in result.output
