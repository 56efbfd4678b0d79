"""``fp4kv --help`` and every command's ``--help`` load no torch / transformers (they took 6-8 s)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "safetensors", "matplotlib", "numpy")
COMMANDS = ["", "calibrate", "export-scales", "inspect", "eval gsm8k", "analyze", "recipe", "methods",
            "bench kernels", "convert", "eval lm-eval", "eval longctx", "run"]  # fmt: skip


def test_help_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from fp4kv_cli.cli import app\n"
        f"for command in {COMMANDS!r}:\n"
        "    result = CliRunner().invoke(app, [*command.split(), '--help'])\n"
        "    assert result.exit_code == 0, (command, result.output)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
