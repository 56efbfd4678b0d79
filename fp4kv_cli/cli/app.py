"""The Typer application objects, shared consoles, and the one-line error convention."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from fp4kv_cli.errors import FP4KVError, is_out_of_memory

app = typer.Typer(
    name="fp4kv",
    help="Calibrate, export and evaluate 4-bit (NVFP4 / block FP4) KV caches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Accuracy with the KV cache really stored in a chosen format.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print machine, versions and figures.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

#: ``--device`` / ``--dtype`` of the commands that load a model to run it.
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="Model dtype: auto, bf16, fp16, fp32.")]
#: ``--device-map`` / ``--max-memory``: accelerate places a model too large for one device.
DeviceMapOption = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="auto, balanced, balanced_low_0 or sequential: accelerate places the layers over the GPUs "
        "(then CPU, then disk, past --max-memory); --device is then unused. Default: all on --device.",
    ),
]
MaxMemoryOption = Annotated[
    str | None,
    typer.Option("--max-memory", help="Per-device limits for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB."),
]

#: ``--budget`` / ``--kl-budget`` / ``--write-recipe`` of the commands that choose a mixed recipe.
BudgetOption = Annotated[
    float, typer.Option("--budget", help="Recipe's mean stored bytes per cached element, at most.")
]
KlBudgetOption = Annotated[
    float,
    typer.Option("--kl-budget", help="Tensors whose lone KL is at most this stay in the base --format."),
]
WRITE_RECIPE_HELP = "Write the scales file with the recipe's per-layer formats here."

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def guarded(func: F | None = None, *, oom_fix: str = "lower --batch-size") -> Any:
    """Turn :class:`FP4KVError` raised by a command into a one-line error and exit code 2; the
    same for running out of (GPU or CPU) memory, with ``oom_fix`` as the fix.

    Use as ``@guarded`` or ``@guarded(oom_fix="lower --seq-len")``.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return command(*args, **kwargs)
            except FP4KVError as err:
                _fail(str(err))
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                lines = str(err).strip().splitlines()
                what = lines[0] if lines else type(err).__name__
                _fail(f"out of memory ({what}); {oom_fix}")

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2) from None
