"""``summary.png`` is drawn for every accuracy a run can end with, and a chart never fails a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fp4kv_cli.evaluate.metrics import accuracy, wilson_interval
from fp4kv_cli.evaluate.results import plot_summary, try_plot_summary


def _summary(flags: dict[str, list[bool]], kl: bool = True) -> dict:
    results = {}
    for kv, values in flags.items():
        acc = accuracy(values).to_dict()
        fidelity = {"kl": 0.0 if kv == "bf16" else 0.01, "top1": 1.0} if kl else None
        results[kv] = {"accuracy": {"strict": acc, "flexible": acc}, "fidelity": fidelity}
    return {"model": "tiny", "num_questions": len(next(iter(flags.values()))), "results": results}


@pytest.mark.parametrize("n", [1, 5, 10, 13, 17, 20, 34])
def test_wilson_bounds_hold_the_proportion_exactly(n: int) -> None:
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
    for k in range(n + 1):
        low, high = wilson_interval(k, n)
        assert 0.0 <= low <= k / n <= high <= 1.0


@pytest.mark.parametrize(
    "flags",
    [
        {"bf16": [False] * 20, "nvfp4": [False] * 20},  # 0 %: lower bound 1.4e-17 before the fix
        {"bf16": [True] * 13, "fp8": [True] * 13},  # 100 %
        {"bf16": [True], "nvfp4": [False]},  # n = 1
        {"nvfp4": [True, False, False]},  # one format
    ],
    ids=["zero", "all", "n1", "one-format"],
)
def test_plot_draws_edge_cases(flags: dict[str, list[bool]], tmp_path: Path) -> None:
    path = plot_summary(tmp_path, _summary(flags))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_fidelity(tmp_path: Path) -> None:
    assert plot_summary(tmp_path, _summary({"bf16": [False] * 5}, kl=False)).is_file()


def test_failed_plot_returns_reason_and_drops_stale_png(tmp_path: Path) -> None:
    (tmp_path / "summary.png").write_bytes(b"old")
    broken = {"model": "m", "num_questions": 1, "results": {"bf16": {"accuracy": {}}}}
    png, reason = try_plot_summary(tmp_path, broken)
    assert png is None and reason.startswith("KeyError")
    assert not (tmp_path / "summary.png").exists()
