"""lm-eval's own command line with the ``fp4kv`` model registered:
``python -m fp4kv_cli.evaluate.harness run --model fp4kv --model_args pretrained=M,kv_dtype=nvfp4 --tasks gsm8k``."""

from lm_eval.__main__ import cli_evaluate

import fp4kv_cli.evaluate.harness  # noqa: F401  (registers the model)

if __name__ == "__main__":
    cli_evaluate()
