"""The one exception type for bad user input: the CLI prints it as a one-line error, exit 2.
Running out of memory counts as bad input too (the fix is a smaller batch)."""

from __future__ import annotations

import sys

#: Texts of allocator failures that torch raises as plain ``RuntimeError`` (CPU, older CUDA).
OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory")


class FP4KVError(ValueError):
    """Bad input the user can fix; the message names the problem and the fix."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``torch.OutOfMemoryError`` (CUDA), a
    ``RuntimeError`` from an allocator, or Python's ``MemoryError``."""
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")  # never imported here: a command that ran torch has it
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err).lower() for text in OOM_TEXTS)
