"""K centering as an engine serves it, with no engine imported: the checkpoint marker, the
offsets sidecar, the checks against the served model, and the subtraction itself.

An export made with ``fp4kv export-scales --k-centering plugin`` carries, per attention layer
``N``, a float32 ``[num_kv_heads, head_dim]`` tensor ``<prefix>.N.self_attn.k_proj.k_offset``
(the calibrated post-RoPE mean of K) in :data:`OFFSET_FILE`, and a :data:`MARKER` entry in
``config.json``. An engine that honours it stores and attends to ``K - k_offset``; softmax
cancels the per-query constant ``q . k_offset``, so attention is unchanged up to rounding while
the cache quantizes a K without its large constant part.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fp4kv_cli.errors import FP4KVError

#: config.json key an export with ``--k-centering plugin`` writes; its presence asks for centering.
MARKER = "fp4kv_k_centering"
#: Offsets sidecar (not in the safetensors index: engines' loaders fail on unknown k_proj.* names).
OFFSET_FILE = "fp4kv-k-offset.safetensors"
#: Version of the marker's layout.
MARKER_VERSION = 1
_OFFSET_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.k_proj\.k_offset$")
_ATTN_PREFIX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class CenteringError(FP4KVError):
    """A checkpoint's K offsets are missing or do not fit the served model."""


def marker(num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, Any]:
    """The ``config.json`` entry of a K-centered export."""
    return {
        "version": MARKER_VERSION,
        "file": OFFSET_FILE,
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "stored": "K - k_offset (post-RoPE, per layer, per KV-head channel)",
        "served_by": "fp4kv vLLM plugin (pip install fp4kv); engines without it get K scales of centered K",
    }


@dataclass(frozen=True)
class Offsets:
    """Per-layer K offsets of one checkpoint, float32 ``[num_kv_heads, head_dim]`` each."""

    folder: Path
    layers: dict[int, torch.Tensor]


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The :data:`MARKER` entry of ``folder/config.json`` (top level or ``text_config``), or None."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    entry = config.get(MARKER)
    if entry is None and isinstance(config.get("text_config"), dict):
        entry = config["text_config"].get(MARKER)
    return entry if isinstance(entry, dict) else None


def load_offsets(folder: Path, entry: dict[str, Any]) -> Offsets:
    """Read the offsets the marker ``entry`` of ``folder`` points to."""
    from safetensors import safe_open

    path = folder / str(entry.get("file", OFFSET_FILE))
    if not path.is_file():
        raise CenteringError(
            f"fp4kv: {folder} asks for K centering but has no {path.name}; re-export it with "
            "fp4kv export-scales --k-centering plugin"
        )
    layers = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            match = _OFFSET_NAME.search(name)
            if match is not None:
                layers[int(match[1])] = handle.get_tensor(name).to(torch.float32)
    return Offsets(folder, layers)


def check_offsets(offsets: Offsets, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
    """Raise :class:`CenteringError` unless there is one ``[num_kv_heads, head_dim]`` offset for
    each of the model's ``num_layers`` layers."""
    fix = "export the scales calibrated on this model (fp4kv calibrate --center-k, export-scales)"
    expected = set(range(num_layers))
    if set(offsets.layers) != expected:
        raise CenteringError(
            f"fp4kv: {offsets.folder} has K offsets for {len(offsets.layers)} layers "
            f"(indices {_span(offsets.layers)}) but the model has {num_layers}; {fix}"
        )
    for index in sorted(offsets.layers):
        shape = tuple(offsets.layers[index].shape)
        if shape != (num_kv_heads, head_dim):
            raise CenteringError(
                f"fp4kv: {offsets.folder} layer {index} K offset is {list(shape)} but the model needs "
                f"[{num_kv_heads}, {head_dim}] (kv heads x head_dim); {fix}"
            )
        if not torch.isfinite(offsets.layers[index]).all():
            raise CenteringError(f"fp4kv: {offsets.folder} layer {index} K offset is not finite; {fix}")


def _span(indices: Any) -> str:
    ordered = sorted(indices)
    return "none" if not ordered else f"{ordered[0]}..{ordered[-1]}"


def layer_index(prefix: str) -> int | None:
    """Decoder layer index in an attention module's name (``model.layers.3.self_attn.attn`` -> 3)."""
    match = _ATTN_PREFIX.search(prefix)
    return None if match is None else int(match[1])


def rank_heads(total_kv_heads: int, local_kv_heads: int, rank: int, world: int) -> list[int]:
    """KV heads a tensor-parallel rank holds, as vLLM's QKV projection splits them: contiguous
    blocks when heads >= ranks, else each head replicated on ``world / heads`` ranks."""
    if total_kv_heads >= world:
        return list(range(rank * local_kv_heads, (rank + 1) * local_kv_heads))
    replicas = world // total_kv_heads
    return [rank // replicas]


def center_key(key: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``key - offset`` in float32, back in ``key``'s dtype and shape; ``key`` is ``[tokens,
    heads * head_dim]`` or ``[tokens, heads, head_dim]``, ``offset`` ``[heads, head_dim]``."""
    heads, head_dim = offset.shape
    centered = key.reshape(-1, heads, head_dim).float() - offset
    return centered.to(key.dtype).reshape(key.shape)
