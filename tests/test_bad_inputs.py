"""Every bad input of issue 15 ends in one line ``error: <problem>; <fix>`` and exit 2, before any
output is written; plus inspect's hazard exit code, the export report at 80 columns, and
progress lines in logs."""

from __future__ import annotations

import io
import json
import string
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fp4kv_cli import validate
from fp4kv_cli.cli import app
from fp4kv_cli.errors import is_out_of_memory
from fp4kv_cli.evaluate import results as eval_results
from fp4kv_cli.evaluate import runner as eval_runner
from fp4kv_cli.progress import LoggedProgress, status

cli = CliRunner()
FAST = ["--num-fewshot", "1", "--max-new-tokens", "2", "--device", "cpu", "--no-fidelity", "--limit", "1"]
UNWRITABLE = "/proc/fp4kv-test/x.json"  # /proc takes no new files, even for root


def _error(args: list[str], message: str) -> str:
    """Run the CLI; assert exit 2 and a last line ``error: ...message...``; return the output."""
    result = cli.invoke(app, args)
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """Bad inputs: GGUF files 100 bytes long, truncated and fake; a config.json holding a list;
    scales files with a string / list amax; a tiny BERT; a model whose weights are cut short."""
    import gguf
    import numpy as np

    root = tmp_path_factory.mktemp("bad")
    whole = root / "whole.gguf"
    writer = gguf.GGUFWriter(str(whole), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = whole.read_bytes()
    (root / "short.gguf").write_bytes(data[:100])
    (root / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (root / "fake.gguf").write_text("not a gguf file\n")
    (root / "listcfg").mkdir()
    (root / "listcfg" / "config.json").write_text("[1, 2]")
    scales = json.loads(_calibrated(tiny_llama_dir, root / "good.json").read_text())
    for name, value in (("abc", "abc"), ("list", [1.0, 2.0])):
        bad = json.loads(json.dumps(scales))
        bad["layers"][0]["k_amax"] = value
        (root / f"scales-{name}.json").write_text(json.dumps(bad))
    broken = root / "broken"
    broken.mkdir()
    for item in tiny_llama_dir.iterdir():
        target = broken / item.name
        target.write_bytes(item.read_bytes()[:300] if item.suffix == ".safetensors" else item.read_bytes())
    from conftest import SPECIAL_TOKENS, char_tokenizer
    from transformers import BertConfig, BertLMHeadModel

    vocab = len(SPECIAL_TOKENS) + len(set(string.printable))
    bert = BertLMHeadModel(BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    bert.save_pretrained(root / "bert")
    char_tokenizer(True).save_pretrained(root / "bert")
    return {p.stem if p.is_file() else p.name: p for p in root.iterdir()}


def _calibrated(model: Path, out: Path) -> Path:
    result = cli.invoke(app, ["calibrate", "--model", str(model), "--num-samples", "2", "--seq-len", "16",
                              "--batch-size", "2", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


# --- output paths checked before any work ---------------------------------------------------


def test_calibrate_unwritable_out_fails_before_calibrating(tiny_llama_dir: Path) -> None:
    output = _error(["calibrate", "--model", str(tiny_llama_dir), "--out", UNWRITABLE], "cannot write --out")
    assert "calibrating" not in output and "loading" not in output


@pytest.mark.parametrize("fmt", ["json", "modelopt"])
def test_export_unwritable_out(files: dict[str, Path], tiny_llama_dir: Path, fmt: str) -> None:
    out = UNWRITABLE if fmt == "json" else str(Path(UNWRITABLE).parent / "folder")
    _error(["export-scales", str(files["good"]), "--model-dir", str(tiny_llama_dir), "--kv-dtype", "fp8",
            "--format", fmt, "--out", out], "cannot write --out")  # fmt: skip


def test_bench_out_defaults_under_results_and_is_checked_first() -> None:
    import inspect

    from fp4kv_cli.cli.bench_cmd import kernels

    assert inspect.signature(kernels).parameters["out"].default == Path("results")
    _error(["bench", "kernels", "--out", str(Path(UNWRITABLE).parent)], "cannot write --out")


# --- GGUF files, configs, scales files ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [("short", "cannot read GGUF file"), ("truncated", "cannot read GGUF file"), ("fake", "not a GGUF file")],
)
@pytest.mark.parametrize("command", ["eval", "convert", "methods"])
def test_bad_gguf(files: dict[str, Path], tmp_path: Path, name: str, message: str, command: str) -> None:
    gguf = str(files[name])
    args = {
        "eval": ["eval", "gsm8k", "--model", gguf, "--out", str(tmp_path / "o"), *FAST],
        "convert": ["convert", gguf, "--out", str(tmp_path / "o")],
        "methods": ["methods", "--model", gguf],
    }[command]
    _error(args, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["eval", "methods"])
def test_config_holding_a_list(files: dict[str, Path], tmp_path: Path, command: str) -> None:
    model = str(files["listcfg"])
    args = ["methods", "--model", model] if command == "methods" else [
        "eval", "gsm8k", "--model", model, "--out", str(tmp_path / "o"), *FAST]  # fmt: skip
    _error(args, "holds a JSON list, not an object")


@pytest.mark.parametrize(("name", "shown"), [("abc", "'abc'"), ("list", "[1.0, 2.0]")])
@pytest.mark.parametrize("command", ["inspect", "export", "eval"])
def test_scales_amax_not_a_number(
    files: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path, name: str, shown: str, command: str
) -> None:
    scales = str(files[f"scales-{name}"])
    args = {
        "inspect": ["inspect", scales],
        "export": [
            "export-scales",
            scales,
            "--model-dir",
            str(tiny_llama_dir),
            "--kv-dtype",
            "fp8",
            "--format",
            "json",
            "--out",
            str(tmp_path / "e.json"),
        ],
        "eval": [
            "eval",
            "gsm8k",
            "--model",
            str(tiny_llama_dir),
            "--scales",
            scales,
            "--out",
            str(tmp_path / "o"),
            *FAST,
        ],
    }[command]
    _error(args, f"layer 0 k_amax is {shown}, not a number")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    ("suffix", "message"), [(".safetensors", "is a weights file"), (".gguf", "is a GGUF file")]
)
def test_inspect_binary_files(
    files: dict[str, Path], tiny_llama_dir: Path, suffix: str, message: str
) -> None:
    path = tiny_llama_dir / "model.safetensors" if suffix == ".safetensors" else files["whole"]
    _error(["inspect", str(path)], message)


def test_inspect_binary_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_bytes(b"\xc3\x28\xff\x00")
    _error(["inspect", str(tmp_path / "x.json")], "is not a JSON text file")


# --- models without a KV cache, missing paths, the hub ---------------------------------------


def test_encoder_model_refused_by_eval_and_calibrate(files: dict[str, Path], tmp_path: Path) -> None:
    bert = str(files["bert"])
    _error(["eval", "gsm8k", "--model", bert, "--out", str(tmp_path / "o"), *FAST], "bert model (an encoder")
    _error(["calibrate", "--model", bert, "--num-samples", "2", "--out", str(tmp_path / "s.json")],
           "bert model (an encoder")  # fmt: skip
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.json").exists()


def test_missing_relative_path_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    start = time.perf_counter()
    for model in ("models/smollm2", "a/b/c", "./nothere", "nothere.gguf"):
        _error(["methods", "--model", model], "does not exist")
        _error(["calibrate", "--model", model, "--out", "s.json"], "does not exist")
    assert time.perf_counter() - start < 10


def test_hub_id_with_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "hub_reachable", lambda: False)
    start = time.perf_counter()
    _error(["methods", "--model", "someone/not-cached-model"], "the hub (")
    assert time.perf_counter() - start < 5


def test_looks_local() -> None:
    assert not validate.looks_local("Qwen/Qwen2.5-1.5B") and not validate.looks_local("gpt2")
    for model in ("./m", "/abs/m", "~/m", "a/b/c", "m.gguf", "m.json", "bad name", "a--b"):
        assert validate.looks_local(model), model


# --- eval: a failed start leaves no run folder -------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "cuda"], "CUDA is not available"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--chat"], "has no chat template"),
        (["--model", "BROKEN"], "cannot load model"),
        (["--num-fewshot", "100000"], "--num-fewshot 100000 is more than the 7473"),
    ],
)
def test_failed_eval_start_leaves_no_run_folder(
    files: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    extra = [str(files["broken"]) if a == "BROKEN" else a for a in extra]
    out = tmp_path / "o"
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--out", str(out), "--run-name", "r", *FAST]
    _error([*args, *extra], message)
    assert not out.exists()


def test_eval_after_a_failed_start_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--out", str(tmp_path), "--run-name", "r",
            "--kv-dtype", "nvfp4", *FAST]  # fmt: skip
    _error([*args, "--dtype", "int8"], "unknown dtype")
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "summary.json").is_file()


def test_failing_plot_does_not_fail_a_finished_eval(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_plot(*_args: object) -> None:
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(eval_results, "plot_summary", broken_plot)
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--out", str(tmp_path), "--run-name", "r",
            "--kv-dtype", "bf16", *FAST]  # fmt: skip
    result = cli.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "summary.png not drawn (ValueError: 'yerr'" in result.output
    assert (tmp_path / "r" / "summary.json").is_file() and not (tmp_path / "r" / "summary.png").exists()


# --- out of memory ----------------------------------------------------------------------------


def test_cuda_out_of_memory_names_the_fix(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*_args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 35.00 GiB (GPU 0; 139 GiB total)")

    monkeypatch.setattr(eval_runner, "generate_batch", oom)
    args = [
        "eval",
        "gsm8k",
        "--model",
        str(tiny_llama_dir),
        "--out",
        str(tmp_path),
        "--kv-dtype",
        "bf16",
        *FAST,
    ]
    output = _error(args, "out of memory (CUDA out of memory. Tried to allocate 35.00 GiB")
    assert "lower --batch-size" in output


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# --- inspect's exit code, export's choices and report ----------------------------------------


def test_inspect_exit_code_3_on_hazards(files: dict[str, Path], tmp_path: Path) -> None:
    assert cli.invoke(app, ["inspect", str(files["good"])]).exit_code == 0
    data = json.loads(files["good"].read_text())
    data["layers"][0]["k_amax"] = 1e-6  # implausible: a hazard
    (tmp_path / "h.json").write_text(json.dumps(data))
    result = cli.invoke(app, ["inspect", str(tmp_path / "h.json")])
    assert result.exit_code == 3 and "hazard:" in result.output


def test_export_choices_are_case_insensitive(
    files: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    result = cli.invoke(app, ["export-scales", str(files["good"]), "--model-dir", str(tiny_llama_dir),
                              "--kv-dtype", "NVFP4", "--format", "JSON", "--target", "SM100",
                              "--out", str(tmp_path / "e.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["kv_dtype"] == "nvfp4"
    assert eval_runner.parse_kv_dtypes("NVFP4, BF16") == ("nvfp4", "bf16")


@pytest.mark.parametrize("kv_dtype", ["nvfp4", "fp8"])
def test_export_report_never_wraps_a_number_at_80_columns(
    files: dict[str, Path], tiny_llama_dir: Path, tmp_path: Path, kv_dtype: str
) -> None:
    from fp4kv_cli.export.exporter import ExportRequest, export_scales
    from fp4kv_cli.export.report import report_tables

    target = {"target": "sm100"} if kv_dtype == "nvfp4" else {}
    report = export_scales(ExportRequest(scales=files["good"], out=tmp_path / "e.json", kv_dtype=kv_dtype,
                                         fmt="json", model_dir=tiny_llama_dir, **target)).report  # fmt: skip
    for width, tables in ((80, 2), (200, 1)):
        buffer = io.StringIO()
        console = Console(file=buffer, width=width)
        found = report_tables(report, console)
        for table in found:
            console.print(table)
        assert len(found) == tables
        text = buffer.getvalue()
        assert "…" not in text and max(map(len, text.splitlines())) <= width
        for layer in report["layers"]:
            assert f"{layer['k_scale']:.6g}" in text and f"{layer['k_amax']:.5g}" in text


def test_calibrate_records_per_head_by_default(files: dict[str, Path]) -> None:
    data = json.loads(files["good"].read_text())  # written by `fp4kv calibrate` without --per-head
    assert all(len(layer["k_amax_per_head"]) == 2 for layer in data["layers"])


# --- progress in logs ---------------------------------------------------------------------------


def test_progress_prints_plain_lines_when_not_a_terminal() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=100)
    with LoggedProgress(console=console, log_seconds=3600) as progress:
        task = progress.add_task("gsm8k nvfp4", total=20)
        for _ in range(20):
            progress.advance(task)
    lines = [line for line in buffer.getvalue().splitlines() if line.startswith("gsm8k nvfp4: ")]
    assert len(lines) == 10 and lines[0].startswith("gsm8k nvfp4: 2/20 (10%), elapsed 0:00")
    assert lines[-1].startswith("gsm8k nvfp4: 20/20 (100%)")


def test_progress_without_total_prints_by_time() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=100)
    with LoggedProgress(console=console, unit="tokens", log_seconds=0.0) as progress:
        task = progress.add_task("calibrating", total=None)
        progress.update(task, advance=1000)
        progress.update(task, advance=500)
    assert "calibrating: 1,500 tokens, elapsed 0:00" in buffer.getvalue()


def test_progress_in_a_terminal_prints_no_plain_lines() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with LoggedProgress(console=console, log_seconds=0.0) as progress:
        task = progress.add_task("x", total=4)
        for _ in range(4):
            progress.advance(task)
    assert "x: 1/4" not in buffer.getvalue()


def test_status_prints_plain_lines_when_not_a_terminal() -> None:
    buffer = io.StringIO()
    with status(Console(file=buffer, force_terminal=False), "loading m"):
        pass
    assert buffer.getvalue().splitlines()[0] == "loading m ..."
    assert buffer.getvalue().splitlines()[1].startswith("loading m: done in ")


def test_inspect_table_holds_every_number_at_80_columns(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from fp4kv_cli.cli.app import console

    monkeypatch.setattr(console, "width", 80)
    result = cli.invoke(app, ["inspect", str(files["good"])])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    for layer in json.loads(files["good"].read_text())["layers"]:
        assert f"{layer['k_amax'] / 2688:.6g}" in result.output
