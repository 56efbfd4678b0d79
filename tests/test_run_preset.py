"""``fp4kv run``: presets parse (the shipped ones too), a bad preset is a one-line error naming
the key, and a tiny model runs end to end, then again with every step skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fp4kv_cli.cli import app
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.pipeline.preset import load_preset

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
cli = CliRunner()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_presets_parse(path: Path) -> None:
    preset = load_preset(path)
    assert preset.name == path.stem and preset.eval is not None
    if preset.scales is not None:
        assert (path.parent / preset.scales).is_file()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


GOOD = 'name = "x"\nout = "o"\n[model]\npath = "m"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "[calibrate]\nnum_sample = 3\n", "unknown key calibrate.num_sample"),
        (GOOD + "[eval]\nkv_dtypes = ['bf16', 'int3']\n", "key eval.kv_dtypes.1"),
        (GOOD + "[eval]\nlimit = 0\n", "key eval.limit"),
        (GOOD + "[calibrate]\nseq_len = 'long'\n", "key calibrate.seq_len"),
        ('name = "x"\n[model]\npath = "m"\n', "missing key out"),
        ('name = "x"\nout = "o"\n[model]\nfetch = "gpt5"\n', "key model.fetch"),
        ('name = "x"\nout = "o"\n[model]\n', "give exactly one of fetch or path"),
        (GOOD + "[export]\nkv_dtype = 'nvfp4'\n", "[export] needs scales"),
        ("colour = 1\n" + GOOD, "unknown key colour"),
        ("name = ", "is not valid TOML"),
    ],
)
def test_bad_preset_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(FP4KVError) as err:
        load_preset(_write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_preset_through_the_cli(tmp_path: Path) -> None:
    result = cli.invoke(app, ["run", str(_write(tmp_path, GOOD + "[eval]\nbatchsize = 2\n"))])
    assert result.exit_code == 2
    assert "unknown key eval.batchsize" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    missing = cli.invoke(app, ["run", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2 and "cannot read preset" in missing.output


#: The fields report.json promises (top level, per format, convention check).
REPORT_KEYS = {"preset", "model", "results_dir", "files", "machine", "versions", "phases", "wall_seconds",
               "convention_check", "eval"}  # fmt: skip
FORMAT_KEYS = {"kl", "top1", "k_rel_error_mean", "v_rel_error_mean", "k_rel_error", "v_rel_error",
               "bytes_per_token", "bytes_vs_bf16", "tokens_per_gib", "gsm8k_strict", "gsm8k_flexible",
               "scale_source", "k_centering"}  # fmt: skip


@pytest.mark.slow
def test_run_end_to_end_then_skips_everything(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    preset = _write(
        tmp_path,
        f"""name = "tiny"
out = "{out}"
[model]
path = "{tiny_llama_dir}"
[calibrate]
num_samples = 2
seq_len = 32
batch_size = 2
center_k = true
[export]
kv_dtype = "nvfp4"
format = "modelopt"
target = "sm100"
[eval]
kv_dtypes = ["bf16", "fp8", "nvfp4", "blockfp4"]
limit = 2
batch_size = 2
max_new_tokens = 4
num_fewshot = 0
fidelity_samples = 1
device = "cpu"
""",
    )
    first = cli.invoke(app, ["run", str(preset)])
    assert first.exit_code == 0, first.output
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    formats = report["eval"]["formats"]
    assert list(formats) == ["bf16", "fp8", "nvfp4", "blockfp4"]
    for kv, row in formats.items():
        assert FORMAT_KEYS <= set(row), kv
    # bf16 storage is the 1.0x reference although the tiny model computes in fp32 on CPU.
    assert formats["bf16"]["bytes_vs_bf16"] == 1.0 and formats["bf16"]["kl"] == 0.0
    assert formats["nvfp4"]["bytes_vs_bf16"] == pytest.approx(9 / 32)
    assert formats["nvfp4"]["tokens_per_gib"] == (1 << 30) // formats["nvfp4"]["bytes_per_token"]
    assert formats["nvfp4"]["kl"] > 0 and formats["nvfp4"]["k_centering"]
    check = report["convention_check"]
    assert check["ok"] and check["exported_convention"] == check["inspected_convention"]
    assert (out / "report.png").stat().st_size > 10_000
    assert "GSM8K" in first.output and "export -> inspect" in first.output
    config = json.loads((out / "eval" / "config.json").read_text())
    assert config["decode_attention"] == "gather"  # what ran on CPU, not the graph default
    assert set(report["phases"]) >= {"calibrate", "export", "inspect", "eval", "total"}

    second = cli.invoke(app, ["run", str(preset)])
    assert second.exit_code == 0, second.output
    again = json.loads((out / "report.json").read_text())
    assert not any(p["ran"] for name, p in again["phases"].items() if name != "total")
    assert again["eval"]["formats"] == formats
    assert again["phases"]["calibrate"]["seconds_when_run"] == report["phases"]["calibrate"]["seconds"]

    # A changed eval setting re-runs only the eval (resumed: the finished questions are kept).
    preset.write_text(preset.read_text().replace("fidelity_samples = 1", "fidelity_samples = 2"))
    third = cli.invoke(app, ["run", str(preset)])
    assert third.exit_code == 0, third.output
    phases = json.loads((out / "report.json").read_text())["phases"]
    assert phases["eval"]["ran"] and not phases["calibrate"]["ran"] and not phases["export"]["ran"]


def test_wall_seconds_add_up_over_resumed_sessions(tmp_path: Path) -> None:
    import time

    from fp4kv_cli.evaluate.runner import RunClock

    first = RunClock(tmp_path, time.perf_counter() - 10.0).save()  # a session of ~10 s, killed
    assert first["sessions"] == 1 and first["wall_seconds"] >= 10.0
    second = RunClock(tmp_path, time.perf_counter() - 5.0).save()  # the resume: ~5 s more
    assert second["sessions"] == 2
    assert second["wall_seconds"] == pytest.approx(first["wall_seconds"] + second["wall_seconds_session"])
    assert 5.0 <= second["wall_seconds_session"] < 10.0


def test_decode_read_recorded_is_the_one_that_runs_on_cpu() -> None:
    import torch

    from fp4kv_cli.evaluate.runner import effective_decode

    cpu = torch.device("cpu")
    assert [effective_decode(d, cpu) for d in ("graph", "fused", "gather")] == ["gather"] * 3
    assert effective_decode("bogus", cpu) == "bogus"  # left for the option check to refuse
