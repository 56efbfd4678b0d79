"""``python -m fp4kv_cli``: the ``fp4kv`` command without installing the console script."""

from fp4kv_cli.cli import main

main()
