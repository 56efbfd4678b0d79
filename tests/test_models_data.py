"""Data loading (shipped GSM8K, local files), model loading and the GGUF fetch/convert path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

from fp4kv_cli.data import gsm8k_path, load_gsm8k, load_texts
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.models import (
    cache_argument,
    convert_gguf_to_folder,
    load_model_and_tokenizer,
    parse_dtype,
    resolve_device,
)


def test_shipped_gsm8k_splits() -> None:
    assert gsm8k_path("train").is_file() and gsm8k_path("test").is_file()
    rows = load_gsm8k("test")
    assert len(rows) == 1319
    assert set(rows[0]) == {"question", "answer"} and "####" in rows[0]["answer"]
    with pytest.raises(FP4KVError, match="unknown GSM8K split"):
        gsm8k_path("dev")


def test_load_gsm8k_local_copy_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"question": "q?", "answer": "a\n#### 1", "extra": 3}) + "\n\n")
    assert load_gsm8k(path=good) == [{"question": "q?", "answer": "a\n#### 1"}]
    with pytest.raises(FP4KVError, match="does not exist"):
        load_gsm8k(path=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(FP4KVError, match=r"bad.jsonl:1 has no answer field"):
        load_gsm8k(path=bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(FP4KVError, match="not valid JSON"):
        load_gsm8k(path=broken)


def test_load_texts_default_is_gsm8k_train() -> None:
    texts = load_texts(num_samples=3)
    first = load_gsm8k("train")[0]
    assert len(texts) == 3 and texts[0] == f"{first['question']}\n{first['answer']}"
    assert load_texts(text_field="question", num_samples=1) == [first["question"]]
    with pytest.raises(FP4KVError, match="GSM8K has no field"):
        load_texts(text_field="body")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".txt"])
def test_load_texts_local_files(tmp_path: Path, suffix: str) -> None:
    import datasets

    rows = {"text": ["alpha beta", "gamma", "delta epsilon"], "other": ["x", "y", "z"]}
    path = tmp_path / f"data{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(rows["text"]) + "\n")
    else:
        table = datasets.Dataset.from_dict(rows)
        {".jsonl": table.to_json, ".csv": table.to_csv, ".parquet": table.to_parquet}[suffix](str(path))
    assert load_texts(str(path)) == rows["text"]
    assert load_texts(str(tmp_path), num_samples=2) == rows["text"][:2]  # the folder form
    if suffix != ".txt":
        assert load_texts(str(path), text_field="other") == rows["other"]
        with pytest.raises(FP4KVError, match="has no field 'body'.*--text-field"):
            load_texts(str(path), text_field="body")


def test_load_texts_errors(tmp_path: Path) -> None:
    with pytest.raises(FP4KVError, match="does not exist"):
        load_texts(str(tmp_path / "nope.jsonl"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(FP4KVError, match="no non-empty texts"):
        load_texts(str(blank))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "empty.jsonl").write_text("")
    with pytest.raises(FP4KVError, match="is empty"):
        load_texts(str(tmp_path / "sub" / "empty.jsonl"))
    with pytest.raises(FP4KVError, match="holds no non-empty"):
        load_texts(str(tmp_path / "sub"))
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    with pytest.raises(FP4KVError, match="is not a"):
        load_texts(str(odd))


def test_device_and_dtype_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp16") is torch.float16
    assert parse_dtype("auto", torch.device("cpu")) is torch.float32
    assert parse_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(FP4KVError, match="unknown dtype"):
        parse_dtype("int8")
    with pytest.raises(FP4KVError, match="unknown device"):
        resolve_device("tpu")


def test_load_tiny_llama_sets_padding(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), device="cpu", dtype="bf16")
    assert not model.training and model.dtype is torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # no pad token: eos stands in
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert cache_argument(model) in ("cache", "past_key_values")


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(FP4KVError, match="has no config.json"):
        load_model_and_tokenizer(str(tmp_path))
    with pytest.raises(FP4KVError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "m.gguf"))
    with pytest.raises(FP4KVError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "missing-folder"))
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, vocab_size=50).save_pretrained(tmp_path / "t5")
    with pytest.raises(FP4KVError, match=r"t5 model \(an encoder-decoder\); pass a decoder LLM"):
        load_model_and_tokenizer(str(tmp_path / "t5"))


def test_convert_refuses_bad_paths(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(FP4KVError, match="not a .gguf file"):
        convert_gguf_to_folder(tiny_llama_dir / "config.json", tmp_path / "out")
    with pytest.raises(FP4KVError, match="already exists"):
        convert_gguf_to_folder(tmp_path / "m.gguf", tiny_llama_dir)


def test_fetch_model_unknown_name() -> None:
    fetch = load_script("fetch_model")
    with pytest.raises(FP4KVError, match="unknown model 'gpt5'"):
        fetch.fetch_model("gpt5")
    assert fetch.main(["smollm2-135m", "--dest", "/dev/null/x"]) == 2  # unwritable dest: one-line error


@pytest.mark.slow
def test_fetch_replaces_corrupt_copy(tmp_path: Path, smollm2_gguf: Path) -> None:
    fetch = load_script("fetch_model")
    spec = fetch.MODELS["smollm2-135m"]
    assert fetch.sha256_of(smollm2_gguf) == spec.sha256
    (tmp_path / spec.filename).write_bytes(b"not a gguf")
    fetched = fetch.fetch_model("smollm2-135m", tmp_path)
    assert fetched == tmp_path / spec.filename and fetch.sha256_of(fetched) == spec.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == [spec.filename]  # no temp files left


@pytest.mark.slow
def test_smollm2_folder_from_gguf(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    model, tokenizer = load_model_and_tokenizer(str(smollm2_dir), device="cpu", dtype="fp32")
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_convert_command_one_line_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from typer.testing import CliRunner

    from fp4kv_cli.cli import app

    result = CliRunner().invoke(
        app, ["convert", str(tiny_llama_dir / "config.json"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert result.stderr.strip().startswith("error:") and "\n" not in result.stderr.strip()
    assert "not a .gguf file" in result.stderr
