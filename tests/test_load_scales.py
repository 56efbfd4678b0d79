"""Scales loading shared by ``fp4kv eval gsm8k`` and ``scripts/bench_decode.py``
(:func:`fp4kv_cli.evaluate.runner.load_scales_for`): the same file checks, K offsets and error
messages for both."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import REPO, load_script
from transformers import AutoModelForCausalLM, DynamicCache
from typer.testing import CliRunner

from fp4kv_cli.cli import app
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.runner import load_scales_for
from fp4kv_cli.model_config import load_config_dict
from fp4kv_cli.quant.scales import ScalesFileError

#: K offset rows per KV head of the tiny Llama (2 KV heads, head_dim 16).
OFFSET = [[0.1] * 16, [-0.2] * 16]
#: Bad scales files (layers, k_offset per layer) and the error each gives, whoever loads it.
BAD_SCALES = [
    (3, None, ScalesFileError, "scales file has 3 layers but the model has 2"),
    (2, [[0.1] * 8] * 2, FP4KVError, "scales file k_offset has shape (2, 2, 8), the model needs (2, 2, 16)"),
]


def _write_scales(path: Path, layers: int, k_offset: list[list[float]] | None) -> str:
    """A scales file of ``layers`` layers (K amax 4, V amax 2), with ``k_offset`` on each if given."""
    entry = {"k_amax": 4.0, "v_amax": 2.0, **({"k_offset": k_offset} if k_offset is not None else {})}
    data = {"schema": "fp4kv.scales", "version": 1, "layers": [{"index": i, **entry} for i in range(layers)]}
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def bench_decode(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``scripts/bench_decode.py`` as a module (its sibling import of bench_calibrate resolved)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return load_script("bench_decode")


def test_load_scales_for_checks_the_file_and_loads_k_offsets(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = load_config_dict(str(tiny_llama_dir))
    scales_file, offsets = load_scales_for(config, _write_scales(tmp_path / "c.json", 2, OFFSET))
    assert scales_file.num_layers == 2 and scales_file.k_amax() == [4.0, 4.0]
    assert torch.equal(offsets, torch.tensor([OFFSET, OFFSET]))
    assert load_scales_for(config, _write_scales(tmp_path / "p.json", 2, None))[1] is None


@pytest.mark.parametrize(("layers", "k_offset", "error", "message"), BAD_SCALES)
def test_bad_scales_file_errors(
    tiny_llama_dir: Path, tmp_path: Path, layers: int, k_offset: list | None, error: type, message: str
) -> None:
    path = _write_scales(tmp_path / "s.json", layers, k_offset)
    with pytest.raises(error) as raised:
        load_scales_for(load_config_dict(str(tiny_llama_dir)), path)
    assert message in str(raised.value)
    result = CliRunner().invoke(
        app,
        ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--scales", path, "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], result.output


def test_bench_decode_builds_caches_with_the_eval_scales(
    bench_decode: ModuleType, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    path = _write_scales(tmp_path / "c.json", 2, OFFSET)
    make_cache = bench_decode.cache_maker(model, str(tiny_llama_dir), ["nvfp4"], torch.float32, path)
    assert isinstance(make_cache("dynamic", 8), DynamicCache)
    for variant in ("nvfp4", "nvfp4-gather", "nvfp4-graph"):
        layer = make_cache(variant, 8).layers[1]
        assert float(layer.k_scale) == pytest.approx(4 / 2688) and float(layer.v_scale) == pytest.approx(
            2 / 2688
        )
        assert torch.equal(layer.k_offset, torch.tensor(OFFSET))
    assert make_cache("bf16", 8).layers[0].k_offset is None
    unscaled = bench_decode.cache_maker(model, str(tiny_llama_dir), ["nvfp4"], torch.float32, None)
    assert unscaled("nvfp4", 8).layers[0].k_offset is None


@pytest.mark.parametrize(("layers", "k_offset", "error", "message"), BAD_SCALES)
def test_bench_decode_bad_scales_file_errors(
    bench_decode: ModuleType,
    tiny_llama_dir: Path,
    tmp_path: Path,
    layers: int,
    k_offset: list | None,
    error: type,
    message: str,
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    path = _write_scales(tmp_path / "s.json", layers, k_offset)
    with pytest.raises(error) as raised:
        bench_decode.cache_maker(model, str(tiny_llama_dir), ["nvfp4"], torch.float32, path)
    assert message in str(raised.value)
