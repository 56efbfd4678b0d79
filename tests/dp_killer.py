"""``fp4kv`` for a torchrun worker whose rank ``FP4KV_TEST_KILL_RANK`` SIGKILLs itself as it
starts its ``FP4KV_TEST_KILL_AT``-th generated batch (0-based): a data-parallel eval killed
mid-run, for tests/test_data_parallel.py."""

import os
import signal
import sys

from fp4kv_cli.cli import main
from fp4kv_cli.evaluate import runner

real = runner.generate_batch
started: list[int] = []


def dying(*args, **kwargs):  # type: ignore[no-untyped-def]
    if os.environ["RANK"] == os.environ["FP4KV_TEST_KILL_RANK"] and len(started) == int(
        os.environ["FP4KV_TEST_KILL_AT"]
    ):
        os.kill(os.getpid(), signal.SIGKILL)
    started.append(1)
    return real(*args, **kwargs)


runner.generate_batch = dying
sys.argv[0] = "fp4kv"
main()
