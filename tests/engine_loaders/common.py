"""How engines find the tensors of a checkpoint, for the TensorRT-LLM re-implementation.

Mirrors ``filter_duplicate_safetensors_files`` / ``safetensors_weights_iterator``
(vllm-project/vllm ``vllm/model_executor/model_loader/weight_utils.py``): only the files the
index lists are loaded, every tensor of each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def hf_weights_files(model_dir: Path) -> list[Path]:
    """``*.safetensors`` files, filtered to those named in the index when there is one."""
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return files
    weight_map = json.loads(index.read_text())["weight_map"]
    listed = {model_dir / name for name in weight_map.values()}
    return [f for f in files if f in listed]


def iterate_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every loaded file (engines iterate files, not the index's names)."""
    for path in hf_weights_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for name in list(handle.keys()):
                yield name, handle.get_tensor(name)
