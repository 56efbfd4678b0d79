"""Data-parallel ``fp4kv eval gsm8k`` under torchrun (2 CPU processes, gloo): the merged run
folder equals a one-process run's (samples files line for line, fidelity, summary metrics), also
after a kill mid-run and ``--resume``; and the launch options it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script
from typer.testing import CliRunner

from fp4kv_cli.cli import app
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.data_parallel import Ranks

REPO = Path(__file__).resolve().parent.parent
cli = CliRunner()
FAST = ["--num-fewshot", "1", "--max-new-tokens", "8", "--device", "cpu", "--limit", "7"]
BATCH = ["--batch-size", "2"]


def _single(args: list[str], out: Path) -> Path:
    """A one-process run in this process, one CPU thread as each torchrun worker has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = cli.invoke(app, [*args, "--out", str(out), "--run-name", "r"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out / "r"


def _torchrun(
    args: list[str], out: Path, script: list[str] | None = None, **env: str
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += script or ["-m", "fp4kv_cli"]
    environ = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [*command, *args, "--out", str(out), "--run-name", "r"],
        check=False,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _assert_same_run(single: Path, parallel: Path) -> None:
    comparison = load_script("compare_run_folders").compare(single, parallel)
    assert comparison["identical"], comparison
    assert json.loads((parallel / "summary.json").read_text())["processes"] == 2
    assert not (parallel / "shards").exists()
    assert {p.name for p in parallel.iterdir()} == {p.name for p in single.iterdir()}


@pytest.mark.slow
def test_killed_greedy_run_resumes_into_the_single_process_folder(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Rank 1 dies (SIGKILL) as it starts its second nvfp4 batch; torchrun ends rank 0; a second
    launch with --resume scores only what is missing, and the folder equals a one-process run's."""
    kv_dtypes = ["bf16", "nvfp4", "fp8"]
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", ",".join(kv_dtypes),
            "--fidelity-samples", "2", *FAST, *BATCH]  # fmt: skip
    single = _single(args, tmp_path / "single")
    killed = _torchrun(args, tmp_path / "dp", [str(REPO / "tests" / "dp_killer.py")],
                       FP4KV_TEST_KILL_RANK="1", FP4KV_TEST_KILL_AT="3")  # fmt: skip
    run = tmp_path / "dp" / "r"
    assert killed.returncode != 0 and not (run / "summary.json").exists(), killed.stderr[-3000:]
    shards = sorted((run / "shards").glob("*.jsonl"))
    before = {(p.name, r["index"]): r for p in shards for r in _lines(p)}
    rank1 = [name for name, _ in before if name.endswith(".rank1.jsonl")]
    assert sorted(rank1) == ["samples-bf16.rank1.jsonl"] * 3 + ["samples-nvfp4.rank1.jsonl"] * 2
    with (run / "shards" / "samples-nvfp4.rank1.jsonl").open("a") as handle:
        handle.write('{"index": 6, "question": "cut sho')  # a write cut short by the kill

    resumed = _torchrun([*args, "--resume"], tmp_path / "dp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(single, run)
    for kv in kv_dtypes:  # the killed session's records are kept, not scored again (same seconds)
        kept = {r["index"]: r for r in _lines(run / f"samples-{kv}.jsonl")}
        for (name, index), record in before.items():
            if name.startswith(f"samples-{kv}."):
                assert kept[index] == record


@pytest.mark.slow
def test_sampled_run_equals_the_single_process_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Automatic batch (the ranks agree on one plan): 21 rows in batches of 16 and 5."""
    args = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--kv-dtype", "bf16,nvfp4", "--no-fidelity",
            "--samples", "3", "--temperature", "0.8", "--top-p", "0.9", *FAST]  # fmt: skip
    single = _single(args, tmp_path / "single")
    launched = _torchrun(args, tmp_path / "dp")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "results in" in launched.stdout
    _assert_same_run(single, tmp_path / "dp" / "r")
    summary = json.loads((tmp_path / "dp" / "r" / "summary.json").read_text())
    assert summary["batch_size"] == "auto" and summary["results"]["nvfp4"]["batch_size"] == 16


def test_one_process_resumes_what_a_parallel_run_left(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The shards of a killed 2-process session (one ending in a line cut short) are folded in by
    a one-process --resume: their records are kept, the rest scored, the file in row order."""
    args = [
        "eval",
        "gsm8k",
        "--model",
        str(tiny_llama_dir),
        "--kv-dtype",
        "nvfp4",
        "--no-fidelity",
        *FAST,
        *BATCH,
    ]
    reference = _single(args, tmp_path / "ref")
    records = _lines(reference / "samples-nvfp4.jsonl")
    run = _single(args, tmp_path / "run")
    (run / "summary.json").unlink()
    (run / "samples-nvfp4.jsonl").unlink()
    (run / "shards").mkdir()
    planted = [{**r, "seconds": -1.0} for r in records[:4]]  # batches 0 and 1 of 4: ranks 0 and 1
    for rank, part in enumerate((planted[:2], planted[2:])):
        text = "".join(json.dumps(r) + "\n" for r in part)
        (run / "shards" / f"samples-nvfp4.rank{rank}.jsonl").write_text(
            text + ('{"index": 1, "que' if rank else "")
        )
    _single([*args, "--resume"], tmp_path / "run")
    merged = _lines(run / "samples-nvfp4.jsonl")
    assert merged[:4] == planted and _untimed(merged) == _untimed(records)
    assert all(r["seconds"] >= 0 for r in merged[4:]) and not (run / "shards").exists()
    compare = load_script("compare_run_folders").compare
    assert compare(reference, run)["identical"]
    merged[5]["output"] += "!"
    (run / "samples-nvfp4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in merged))
    comparison = compare(reference, run)
    assert not comparison["identical"] and comparison["formats"]["nvfp4"]["output_differs"] == [
        merged[5]["index"]
    ]


def test_launch_environment_checks(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)
    with pytest.raises(FP4KVError, match="one machine"):
        Ranks.from_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(FP4KVError, match="not integers"):
        Ranks.from_env({"WORLD_SIZE": "two"})
    assert Ranks(1, 2, 1).share(list(range(5))) == [1, 3]
    assert Ranks(1, 2, 1).device("cpu") == torch.device("cpu")
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    base = ["eval", "gsm8k", "--model", str(tiny_llama_dir), "--out", str(tmp_path), *FAST, *BATCH]
    for extra, message in (
        (["--device-map", "auto"], "--device-map"),
        (["--engine", "vllm"], "without torchrun"),
    ):
        result = cli.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not list(tmp_path.iterdir())
