"""The ``fp4kv`` command line: each command lives in its own module and registers on import."""

import os

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
    """Console-script entry point.

    Before torch loads: OpenMP threads that wait for work sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE`` unless set). On a CPU shared with other work, spinning threads
    take the cores from the thread that has work: on the 2-core machine under load a CPU eval ran
    about 2x the wall time and CPU time with the default (docs/run.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()
