"""The ``fp4kv`` command line: each command lives in its own module and registers on import."""

from fp4kv_cli.cli import methods_cmd  # noqa: F401
from fp4kv_cli.cli import calibrate_cmd, convert_cmd  # noqa: F401
from fp4kv_cli.cli import eval_cmd  # noqa: F401
from fp4kv_cli.cli import export_cmd, inspect_cmd  # noqa: F401
from fp4kv_cli.cli import bench_cmd  # noqa: F401
from fp4kv_cli.cli import analyze_cmd  # noqa: F401
from fp4kv_cli.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()
