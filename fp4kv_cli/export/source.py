"""Where exported amax come from: a ``scales.json`` or an existing checkpoint's KV scales."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.export.checkpoint import checkpoint_amax, is_checkpoint, load_checkpoint
from fp4kv_cli.model_config import KVShape
from fp4kv_cli.quant.rotation import QKRotation
from fp4kv_cli.quant.scales import LayerAmax, load_scales_file


@dataclass(frozen=True)
class KVSource:
    """Validated per-layer amax plus where they came from.

    ``k_amax_raw[i]`` is the amax of raw (uncentered) K when layer ``i`` has a ``k_offset``
    (then ``layers[i].k_amax`` is the amax of ``K - k_offset``), else ``None``. ``rotation`` is
    the Q/K rotation the K amax were recorded under (then they are of rotated K), or None.
    """

    path: Path
    kind: str
    layers: tuple[LayerAmax, ...]
    k_amax_raw: tuple[float | None, ...]
    description: str
    model: dict[str, Any]
    rotation: QKRotation | None = None


def load_source(path: Path, config: dict[str, Any], source_convention: str | None) -> KVSource:
    """Read ``path`` (a scales.json or a checkpoint folder) and check it fits ``config``."""
    shape = KVShape.from_config(config)
    if path.is_dir():
        if not is_checkpoint(path):
            raise FP4KVError(f"{path} is a folder without config.json; pass a scales.json or a model folder")
        return _from_checkpoint(path, shape, source_convention)
    scales = load_scales_file(path)
    scales.check_model(config)
    for layer in scales.layers:
        _check_heads(layer, shape, str(path))
    raw = tuple(
        None if layer.k_offset is None else amax for layer, amax in zip(scales.layers, scales.k_amax_raw())
    )
    model = scales.data.get("model", {})
    return KVSource(path, "scales", scales.layers, raw, f"scales file {path}", dict(model), scales.rotation())


def _from_checkpoint(path: Path, shape: KVShape, source_convention: str | None) -> KVSource:
    ckpt = load_checkpoint(path)
    convention = source_convention or ckpt.reading.convention
    if convention is None:
        raise FP4KVError(
            f"{path}: cannot tell the convention of its KV scales ({ckpt.reading.basis}); "
            "pass --source-convention 448 or 6x448"
        )
    layers = checkpoint_amax(ckpt, convention, shape.num_layers)
    for layer in layers:
        _check_heads(layer, shape, str(path))
    extra = sorted({t.key.layer for t in ckpt.tensors if t.key.layer >= shape.num_layers})
    if extra:
        raise FP4KVError(
            f"{path} has KV scales for layer {extra[0]} but the model has {shape.num_layers} layers"
        )
    how = "--source-convention" if source_convention else ckpt.reading.basis
    return KVSource(
        path,
        "checkpoint",
        layers,
        (None,) * len(layers),
        f"checkpoint {path} read as {convention} ({how})",
        {"id": str(path), "source_convention": convention, "head_dim": shape.head_dim},
        sidecar_rotation(ckpt.sidecar),
    )


def sidecar_rotation(sidecar: dict[str, Any] | None) -> QKRotation | None:
    """The Q/K rotation an fp4kv sidecar records (None without a sidecar or a rotation)."""
    entry = None if sidecar is None else sidecar.get("qk_rotation")
    return None if entry is None else QKRotation.from_dict(entry, "sidecar qk_rotation")


def _check_heads(layer: LayerAmax, shape: KVShape, source: str) -> None:
    for name, heads in (
        ("k_amax_per_head", layer.k_amax_per_head),
        ("v_amax_per_head", layer.v_amax_per_head),
    ):
        if heads is not None and len(heads) != shape.num_kv_heads:
            raise FP4KVError(
                f"{source}: layer {layer.index} {name} has {len(heads)} heads but the model has "
                f"{shape.num_kv_heads} KV heads; calibrate this model with fp4kv calibrate"
            )
    if layer.k_offset is not None:
        dims = {len(row) for row in layer.k_offset}
        if len(layer.k_offset) != shape.num_kv_heads or dims != {shape.head_dim}:
            raise FP4KVError(
                f"{source}: layer {layer.index} k_offset is not [{shape.num_kv_heads}][{shape.head_dim}]; "
                "calibrate this model with fp4kv calibrate"
            )
