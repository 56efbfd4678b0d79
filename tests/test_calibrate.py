"""``fp4kv calibrate``: captured amax against what the model's own DynamicCache holds, percentiles,
centering, schema, and the one-line errors of the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer
from transformers import DynamicCache
from typer.testing import CliRunner

from fp4kv_cli.calibration import calibrate
from fp4kv_cli.calibration.stats import PERCENTILES, KVStatistics, RealTokens
from fp4kv_cli.cli import app
from fp4kv_cli.data import load_texts
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.model_config import load_config_dict
from fp4kv_cli.models import cache_argument, load_model_and_tokenizer
from fp4kv_cli.quant.scales import config_hash, parse_scales

TEXTS = [
    "Natalia sold clips to 48 of her friends in April.",
    "How many?",
    "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes.",
    "x",
    "Betty is saving money for a new wallet which costs $100.",
]
runner = CliRunner()


def reference_kv(model, tokenizer, texts: list[str], seq_len: int) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: real-token K, V ``[tokens, heads, head_dim]`` (float64) and all-position |K| max,
    read from the model's own DynamicCache after one left-padded forward."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
    mask = enc["attention_mask"]
    cache = DynamicCache()  # no config: every layer keeps every position it was given
    with torch.no_grad():
        model(
            input_ids=enc["input_ids"],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            **{cache_argument(model): cache},
        )
    real = mask.bool()
    return [
        (
            layer.keys.transpose(1, 2)[real].double(),
            layer.values.transpose(1, 2)[real].double(),
            layer.keys.abs().max().item(),
        )
        for layer in cache.layers
    ]


def make_pad_keys_large(model, pad_id: int) -> None:
    """Give the pad token the embedding that maximises layer 0's K channel 0, so pad positions
    would dominate K amax if they were not excluded."""
    with torch.no_grad():
        model.get_input_embeddings().weight[pad_id] = model.model.layers[0].self_attn.k_proj.weight[0] * 10


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_amax_matches_model_cache(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    model, tokenizer = load_model_and_tokenizer(str(folder), device="cpu", dtype="fp32")
    make_pad_keys_large(model, tokenizer.pad_token_id)
    data = calibrate(model, tokenizer, TEXTS, seq_len=40, batch_size=2, per_head=True, model_id=str(folder))
    reference = reference_kv(model, tokenizer, TEXTS, seq_len=40)
    assert reference[0][2] > 1.5 * reference[0][0].abs().max().item()  # pads would have won
    assert len(data["layers"]) == len(reference)
    for entry, (keys, values, _) in zip(data["layers"], reference):
        assert entry["k_amax"] == pytest.approx(keys.abs().max().item(), rel=1e-5)
        assert entry["v_amax"] == pytest.approx(values.abs().max().item(), rel=1e-5)
        assert entry["k_amax_per_head"] == pytest.approx(keys.abs().amax(dim=(0, 2)).tolist(), rel=1e-5)
        assert entry["v_amax_per_head"] == pytest.approx(values.abs().amax(dim=(0, 2)).tolist(), rel=1e-5)
        quantiles = torch.tensor(list(PERCENTILES.values()), dtype=torch.float64)
        expected = torch.quantile(keys.abs().flatten(), quantiles).tolist()
        assert list(entry["k_percentiles"].values()) == pytest.approx(expected, rel=1e-5)  # exact method here
        channel_amax = keys.abs().amax(dim=0)  # [heads, head_dim]
        best = int(channel_amax.argmax())
        top = entry["k_top_channels"][0]
        assert (top["head"], top["channel"]) == divmod(best, channel_amax.shape[1])
        assert "k_offset" not in entry and "k_amax_raw" not in entry
    config = load_config_dict(str(folder))
    assert data["model"]["config_hash"] == config_hash(config)
    assert data["calibration"]["num_tokens"] == reference[0][0].shape[0]  # real tokens of the reference
    assert data["calibration"]["percentile_method"] == "exact"
    parse_scales(data)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_other_decoder_families(family: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = char_tokenizer(with_pad=True)
    tokenizer.padding_side = "left"
    sizes = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    extra = {"head_dim": 32} if family == "qwen3" else {"sliding_window": 8}  # Qwen3: q/k norms
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), num_key_value_heads=1, pad_token_id=1, **sizes, **extra
    )
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config).eval()
    data = calibrate(model, tokenizer, TEXTS, seq_len=24, batch_size=2, per_head=True)
    assert data["model"]["model_type"] == family and data["model"]["num_kv_heads"] == 1
    expected_type = (
        "sliding_attention" if family == "mistral" else "full_attention"
    )  # Mistral: no layer_types
    assert [entry["layer_type"] for entry in data["layers"]] == [expected_type] * 2
    for entry, (keys, values, _) in zip(data["layers"], reference_kv(model, tokenizer, TEXTS, seq_len=24)):
        assert entry["k_amax"] == pytest.approx(keys.abs().max().item(), rel=1e-5)
        assert entry["v_amax"] == pytest.approx(values.abs().max().item(), rel=1e-5)


def test_center_k_is_exact(tiny_qwen2_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_qwen2_dir), device="cpu", dtype="fp32")
    data = calibrate(model, tokenizer, TEXTS, seq_len=40, batch_size=3, per_head=True, center_k=True)
    for entry, (keys, _, _) in zip(data["layers"], reference_kv(model, tokenizer, TEXTS, seq_len=40)):
        mean = keys.mean(dim=0)  # [heads, head_dim]
        assert torch.tensor(entry["k_offset"], dtype=torch.float64) == pytest.approx(mean, abs=1e-6)
        assert mean.abs().max() > 0.1  # the fixture's k_proj bias makes the offset real
        centered = (keys - mean).abs()
        assert entry["k_amax"] == pytest.approx(centered.max().item(), rel=1e-6)
        assert entry["k_amax_per_head"] == pytest.approx(centered.amax(dim=(0, 2)).tolist(), rel=1e-6)
        assert entry["k_amax_raw"] == pytest.approx(keys.abs().max().item(), rel=1e-6)
    assert [entry["layer_type"] for entry in data["layers"]] == [
        "full_attention",
        "full_attention",
        "sliding_attention",
    ]
    parsed = parse_scales(data)
    assert len(parsed.layers[0].k_offset) == 2 and len(parsed.layers[0].k_offset[0]) == 32


def test_subsampled_percentiles_track_exact_ones() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(2, 2, 300, 16), 3 * torch.randn(4, 2, 500, 16)]  # unequal sizes and scales
    total = sum(k.shape[0] * k.shape[2] for k in batches)
    stats = KVStatistics(total_tokens=total, sample_size=1 << 14)
    for keys in batches:
        mask = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.long)
        stats.start_batch(RealTokens.from_mask(mask, torch.device("cpu")))
        stats.record(0, keys, keys)
        assert stats.finish_batch()
    assert not stats.exact(2 * 16)
    summary = stats.layer_summary(0, top_channels=4)
    everything = torch.cat([k.transpose(1, 2).reshape(-1) for k in batches]).abs()
    for name, q in list(PERCENTILES.items())[:2]:
        assert summary.k_percentiles[name] == pytest.approx(torch.quantile(everything, q).item(), rel=0.05)
    assert summary.num_tokens == total
    assert summary.k_amax_raw == everything.max().item()


def _random_writes(seed: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A left-padded mask ``[3, 12]`` and K/V writes of 3 layers; layer 2 has another KV shape."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5], mask[2, :9] = 0, 0
    shapes = [(2, 16), (2, 16), (1, 32)]
    return mask, [
        (
            torch.randn(3, h, 12, d, generator=generator) + 0.5,
            2 * torch.randn(3, h, 12, d, generator=generator),
        )
        for h, d in shapes
    ]


def test_eager_and_batched_folding_agree_with_direct_stats() -> None:
    batches = [_random_writes(0), _random_writes(1)]
    total = sum(int(mask.sum()) for mask, _ in batches)
    summaries = {}
    for eager in (True, False):
        stats = KVStatistics(total_tokens=total, eager=eager)
        for mask, writes in batches:
            stats.start_batch(RealTokens.from_mask(mask, torch.device("cpu")))
            for index, (keys, values) in enumerate(writes):
                stats.record(index, keys, values)
            assert stats.finish_batch()
        assert stats.exact(32) and stats.layer_shape(2) == (1, 32)
        summaries[eager] = [stats.layer_summary(index, top_channels=3) for index in range(3)]
    assert summaries[True] == summaries[False]
    for index in range(3):  # against plain torch on the real tokens
        keys = torch.cat([w[index][0].transpose(1, 2)[m.bool()] for m, w in batches]).double()
        values = torch.cat([w[index][1].transpose(1, 2)[m.bool()] for m, w in batches]).double()
        summary = summaries[True][index]
        assert summary.num_tokens == total and summary.k_amax_raw == keys.abs().max().item()
        assert summary.v_amax_per_head == values.abs().amax(dim=(0, 2)).tolist()
        assert torch.tensor(summary.k_offset) == pytest.approx(keys.mean(dim=0), abs=1e-6)
        assert summary.k_amax_centered == pytest.approx(
            (keys - keys.mean(dim=0)).abs().max().item(), rel=1e-6
        )


def test_gather_paths_agree() -> None:
    mask, writes = _random_writes(2)
    tokens = RealTokens.from_mask(mask, torch.device("cpu"))
    states = [writes[0][0], writes[0][1], writes[1][0]]
    selected = tokens.gather_selected(states)
    assert selected.shape == (int(mask.sum()), 3, 2, 16)
    assert torch.equal(selected, tokens.gather_indexed(states))
    assert torch.equal(selected[:, 1], writes[0][1].transpose(1, 2)[mask.bool()])


def test_nonfinite_capture_names_layer_and_row(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("@")] = float("nan")
    texts = ["plain text", "an @ sign", "more plain text here"]
    with pytest.raises(FP4KVError, match=r"NaN/Inf .* layer 0, dataset row\(s\) 1;"):
        calibrate(model, tokenizer, texts, seq_len=32, batch_size=3)


def _run(*args: str):
    return runner.invoke(app, ["calibrate", *args])


def _one_line_error(result, needle: str) -> None:
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and needle in message, message


@pytest.fixture()
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": text, "n": i}) + "\n" for i, text in enumerate(TEXTS)))
    return path


def test_cli_writes_scales_and_refuses_to_overwrite(
    tiny_llama_dir: Path, jsonl: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scales.json"
    args = ["--model", str(tiny_llama_dir), "--dataset", str(jsonl), "--seq-len", "24", "--batch-size", "2"]
    result = _run(*args, "--per-head", "--device", "cpu", "--dtype", "fp32", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    parse_scales(data)
    assert data["calibration"]["dataset"] == str(jsonl) and data["calibration"]["num_samples"] == len(TEXTS)
    assert data["model"] | {"config_hash": None} == {
        "id": str(tiny_llama_dir),
        "config_hash": None,
        "model_type": "llama",
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 16,
    }
    assert len(data["layers"][1]["v_amax_per_head"]) == 2
    assert "tok/s" in result.stdout and "outlier layers" in result.stdout
    before = out.read_text()
    _one_line_error(_run(*args, "--out", str(out)), "already exists")
    assert out.read_text() == before
    result = _run(*args, "--num-samples", "2", "--out", str(out), "--overwrite")
    assert result.exit_code == 0 and json.loads(out.read_text())["calibration"]["num_samples"] == 2
    result = _run(*args, "--center-k", "--qk-rotation", "head_dim", "--out", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["k_rotation"] == {"kind": "hadamard", "block": 16}


def test_cli_bad_inputs(tiny_llama_dir: Path, jsonl: Path, tmp_path: Path) -> None:
    from transformers import T5Config

    out = tmp_path / "scales.json"
    model, data = ["--model", str(tiny_llama_dir)], ["--dataset", str(jsonl)]
    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, vocab_size=50).save_pretrained(tmp_path / "t5")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (["--model", str(tmp_path / "nope")], data, "does not exist"),
        (["--model", str(tmp_path / "t5")], data, "(an encoder-decoder); pass a decoder LLM"),
        (model, ["--dataset", str(empty)], "is empty"),
        (model, [*data, "--text-field", "body"], "has no field 'body'"),
        (model, [*data, "--seq-len", "0"], "--seq-len must be > 0"),
        (model, [*data, "--batch-size", "-1"], "--batch-size must be > 0"),
        (model, [*data, "--qk-rotation", "12"], "--qk-rotation block must be a power of 2"),
        (model, [*data, "--qk-rotation", "32"], "does not divide head_dim 16"),
    ]
    for model_args, data_args, needle in cases:
        _one_line_error(_run(*model_args, *data_args, "--device", "cpu", "--out", str(out)), needle)
        assert not out.exists()


def test_cli_nonfinite_model_leaves_no_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), device="cpu", dtype="fp32")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    tokenizer.save_pretrained(broken)
    out = tmp_path / "scales.json"
    result = _run(
        "--model", str(broken), "--num-samples", "3", "--seq-len", "16", "--device", "cpu", "--out", str(out)
    )
    _one_line_error(result, "NaN/Inf in the captured K/V first in layer 1, dataset row(s) 0, 1, 2")
    assert not out.exists() and list(tmp_path.iterdir()) == [broken]


@pytest.mark.slow
def test_smollm2_real_model(smollm2_dir: Path, smollm2_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "scales.json"
    result = _run(
        "--model", str(smollm2_dir), "--num-samples", "3", "--seq-len", "48", "--batch-size", "2",
        "--per-head", "--center-k", "--device", "cpu", "--dtype", "fp32", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    parsed = parse_scales(data)
    shape = (data["model"]["num_layers"], data["model"]["num_kv_heads"], data["model"]["head_dim"])
    assert shape == (30, 3, 64)
    assert parsed.config_hash == config_hash(load_config_dict(str(smollm2_gguf)))  # folder and GGUF agree
    assert all(math.isfinite(a) and a > 0 for a in parsed.k_amax() + parsed.v_amax())
    model, tokenizer = load_model_and_tokenizer(str(smollm2_dir), device="cpu", dtype="fp32")
    reference = reference_kv(model, tokenizer, load_texts(num_samples=3), seq_len=48)  # the default GSM8K
    assert data["calibration"]["num_tokens"] == reference[0][0].shape[0]
    for entry, (keys, values, _) in zip(data["layers"], reference):
        mean = keys.mean(dim=0)
        assert torch.tensor(entry["k_offset"], dtype=torch.float64) == pytest.approx(mean, abs=1e-5)
        assert entry["k_amax"] == pytest.approx((keys - mean).abs().max().item(), rel=1e-5)
        assert entry["k_amax_raw"] == pytest.approx(keys.abs().max().item(), rel=1e-5)
        assert entry["v_amax_per_head"] == pytest.approx(values.abs().amax(dim=(0, 2)).tolist(), rel=1e-5)
