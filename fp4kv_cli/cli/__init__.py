"""The ``fp4kv`` command line: each command lives in its own module and registers on import."""

from fp4kv_cli.cli import (  # noqa: F401  # noqa: F401
    analyze_cmd,
    bench_cmd,
    calibrate_cmd,
    convert_cmd,
    eval_cmd,
    export_cmd,
    inspect_cmd,
    lmeval_cmd,
    longctx_cmd,
    methods_cmd,
    recipe_cmd,
    run_cmd,
)
from fp4kv_cli.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()
