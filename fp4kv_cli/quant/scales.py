"""The ``scales.json`` file (calibrated KV amax) and the scale conventions consumers expect.

``scales.json`` holds amax only, never a pre-divided scale. Schema ``fp4kv.scales`` v1::

    {
      "schema": "fp4kv.scales", "version": 1,
      "model": {"id": str, "config_hash": str, "model_type": str, "num_layers": int,
                "num_kv_heads": int, "head_dim": int},
      "calibration": {"dataset": str, "split": str|null, "text_field": str|null,
                      "num_samples": int, "num_tokens": int, "seq_len": int, "dtype": str,
                      "created": str, "fp4kv_version": str},
      "layers": [
        {"index": int, "layer_type": "full_attention"|"sliding_attention",
         "k_amax": float, "v_amax": float,
         "k_amax_per_head": [float]|null, "v_amax_per_head": [float]|null,
         "k_percentiles": {"p99": float, "p99.9": float, "p99.99": float},
         "v_percentiles": {...},
         "k_top_channels": [{"head": int, "channel": int, "amax": float}, ...],
         "k_format": str, "v_format": str}          (optional, see below)
      ]
    }

A per-layer ``k_offset`` entry (``[num_kv_heads][head_dim]`` floats, the calibrated post-RoPE
mean of K, from ``calibrate --center-k``) may be present; when it is, ``k_amax`` is the amax of
``K - k_offset`` and ``k_amax_raw`` keeps the amax of K itself (what an engine that ignores the
offset must be given).

A top-level ``"k_rotation": {"kind": "hadamard", "block": int}`` (``calibrate --qk-rotation``)
says K is stored Hadamard-rotated (:mod:`fp4kv_cli.quant.rotation`), after centering; every K
statistic of the file (``k_amax``, ``k_amax_raw``, per-head amax, percentiles, top channels) is
then of rotated K, while ``k_offset`` stays in the unrotated basis the cache centers in.

Optional per-layer ``"k_format"`` / ``"v_format"`` entries (names of KV cache formats:
``bf16``, ``fp8``, ``nvfp4``, ``blockfp4``) make the file a mixed-format *recipe*, written by
``fp4kv analyze --write-recipe`` and run by ``fp4kv eval gsm8k --kv-dtype recipe``. When
present they must be on every layer, both of them.

Conventions. A *dequant scale* multiplies stored values back to real ones:

- ``"448"``: ``scale = amax / 448``. FP8 KV everywhere; ModelOpt >= 0.42 for NVFP4 too.
- ``"6x448"``: ``scale = amax / (6 * 448) = amax / 2688``. ModelOpt < 0.42 NVFP4 KV; also
  the NVFP4 *global* scale ``g`` that the FP4 kernels use internally.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.formats import E2M1_MAX, E4M3_MAX
from fp4kv_cli.quant.rotation import QKRotation

SCALES_SCHEMA = "fp4kv.scales"
SCALES_VERSION = 1

Convention = Literal["448", "6x448"]
CONVENTION_DIVISORS: dict[str, float] = {"448": E4M3_MAX, "6x448": E2M1_MAX * E4M3_MAX}

#: config.json keys that define the KV cache's shape; their hash ties a scales file to a model.
CONFIG_HASH_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
)


class ScalesFileError(FP4KVError):
    """A scales file or scales dict is malformed or does not match the model."""


def amax_to_scale(amax: float, convention: Convention) -> float:
    """Dequant scale for ``amax`` in ``convention`` (``"448"`` or ``"6x448"``)."""
    return float(amax) / _divisor(convention)


def scale_to_amax(scale: float, convention: Convention) -> float:
    """Inverse of :func:`amax_to_scale`: the amax a stored scale implies."""
    return float(scale) * _divisor(convention)


def convert_scale(scale: float, source: Convention, target: Convention) -> float:
    """Re-express a dequant scale from one convention in another (x6 or /6)."""
    return amax_to_scale(scale_to_amax(scale, source), target)


def _divisor(convention: str) -> float:
    try:
        return CONVENTION_DIVISORS[convention]
    except KeyError:
        raise ScalesFileError(
            f"unknown scale convention {convention!r}; use one of {sorted(CONVENTION_DIVISORS)}"
        ) from None


def config_hash(config: Mapping[str, Any]) -> str:
    """Short sha256 of the KV-shaping fields of a model's ``config.json`` dict.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and
    ``num_key_value_heads`` to ``num_attention_heads``, as transformers does.
    """
    cfg = dict(config.get("text_config") or config)
    heads = cfg.get("num_attention_heads")
    if cfg.get("head_dim") is None and heads:
        cfg["head_dim"] = cfg.get("hidden_size", 0) // heads
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = heads
    picked = {key: cfg.get(key) for key in CONFIG_HASH_KEYS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LayerAmax:
    """Calibrated amax of one attention layer (per-tensor and, when recorded, per KV head)."""

    index: int
    k_amax: float
    v_amax: float
    layer_type: str = "full_attention"
    k_amax_per_head: tuple[float, ...] | None = None
    v_amax_per_head: tuple[float, ...] | None = None
    k_offset: tuple[tuple[float, ...], ...] | None = None
    k_format: str | None = None
    v_format: str | None = None


@dataclass(frozen=True)
class ScalesFile:
    """A validated ``scales.json``: the raw dict plus typed per-layer amax."""

    data: dict[str, Any]
    layers: tuple[LayerAmax, ...]

    @property
    def num_layers(self) -> int:
        """Number of attention layers the file covers."""
        return len(self.layers)

    @property
    def config_hash(self) -> str | None:
        """The config hash of the calibrated model, if recorded."""
        return self.data.get("model", {}).get("config_hash")

    def k_amax(self) -> list[float]:
        """Per-layer K amax."""
        return [layer.k_amax for layer in self.layers]

    def k_amax_raw(self) -> list[float]:
        """Per-layer amax of raw (uncentered) K: ``k_amax`` for a layer without ``k_offset``;
        for a centered one the calibrated ``k_amax_raw`` if recorded, else the bound
        ``k_amax + max|k_offset|`` (|K| <= |K - offset| + |offset|)."""
        raw = []
        for entry, layer in zip(self.data["layers"], self.layers):
            recorded = entry.get("k_amax_raw")
            if layer.k_offset is None:
                raw.append(layer.k_amax)
            elif recorded is not None and float(recorded) > 0:
                raw.append(float(recorded))
            else:
                raw.append(layer.k_amax + max(abs(v) for row in layer.k_offset for v in row))
        return raw

    def v_amax(self) -> list[float]:
        """Per-layer V amax."""
        return [layer.v_amax for layer in self.layers]

    def rotation(self) -> QKRotation | None:
        """The Q/K rotation the file's K statistics were recorded under, if any."""
        return QKRotation.from_dict(self.data.get("k_rotation"))

    def recipe(self) -> tuple[list[str], list[str]] | None:
        """Per-layer K and V format names when the file is a recipe, else None."""
        if all(layer.k_format is None and layer.v_format is None for layer in self.layers):
            return None
        return [layer.k_format for layer in self.layers], [layer.v_format for layer in self.layers]

    def check_model(self, config: Mapping[str, Any], num_layers: int | None = None) -> None:
        """Raise :class:`ScalesFileError` if this file was calibrated on another model."""
        expected = num_layers if num_layers is not None else _num_layers(config)
        if expected is not None and expected != self.num_layers:
            raise ScalesFileError(
                f"scales file has {self.num_layers} layers but the model has {expected}; "
                "calibrate this model with fp4kv calibrate"
            )
        rotation = self.rotation()
        head_dim = (config.get("text_config") or config).get("head_dim")
        if rotation is not None and head_dim is not None and head_dim % rotation.block:
            raise ScalesFileError(
                f"scales file k_rotation block {rotation.block} does not divide the model's head_dim "
                f"{head_dim}; calibrate this model with fp4kv calibrate"
            )
        recorded = self.config_hash
        if recorded is not None and recorded != config_hash(config):
            raise ScalesFileError(
                f"scales file was calibrated on another model (config hash {recorded} != "
                f"{config_hash(config)}); calibrate this model with fp4kv calibrate"
            )


def _num_layers(config: Mapping[str, Any]) -> int | None:
    cfg = config.get("text_config") or config
    return cfg.get("num_hidden_layers")


def parse_scales(data: Mapping[str, Any], source: str = "scales") -> ScalesFile:
    """Validate a scales dict (the JSON of ``scales.json``) into a :class:`ScalesFile`.

    Every amax must be finite and > 0; a zero amax would silently become a zero scale.
    """
    if data.get("schema") != SCALES_SCHEMA:
        raise ScalesFileError(
            f"{source} is not an fp4kv scales file (schema {data.get('schema')!r}); "
            "make one with fp4kv calibrate"
        )
    if data.get("version") != SCALES_VERSION:
        raise ScalesFileError(
            f"{source} has scales schema version {data.get('version')!r}, this fp4kv reads "
            f"version {SCALES_VERSION}; re-run fp4kv calibrate"
        )
    raw_layers = data.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise ScalesFileError(f"{source} has no layers; re-run fp4kv calibrate")
    layers = tuple(_parse_layer(entry, position, source) for position, entry in enumerate(raw_layers))
    formats = [(layer.k_format, layer.v_format) for layer in layers]
    if any(f != (None, None) for f in formats) and any(None in f for f in formats):
        raise ScalesFileError(
            f"{source} gives k_format/v_format for some layers or tensors only; give both on every "
            "layer (fp4kv analyze --write-recipe writes them)"
        )
    try:
        QKRotation.from_dict(data.get("k_rotation"), f"{source} k_rotation")
    except FP4KVError as err:
        raise ScalesFileError(str(err)) from None
    return ScalesFile(data=dict(data), layers=layers)


def _parse_layer(entry: Any, position: int, source: str) -> LayerAmax:
    if not isinstance(entry, Mapping):
        raise ScalesFileError(
            f"{source}: layer entry {position} is {type(entry).__name__}, not an object; re-run fp4kv calibrate"
        )
    index = entry.get("index", position)
    if index != position:
        raise ScalesFileError(f"{source}: layer entry {position} has index {index}; layers must be in order")
    values = {}
    for key in ("k_amax", "v_amax"):
        values[key] = _positive(entry.get(key), f"{source}: layer {index} {key}")
    per_head = {}
    for key in ("k_amax_per_head", "v_amax_per_head"):
        heads = entry.get(key)
        per_head[key] = (
            None
            if heads is None
            else tuple(
                _positive(v, f"{source}: layer {index} {key}[{h}]")
                for h, v in enumerate(_list(heads, f"{source}: layer {index} {key}"))
            )
        )
    offset = entry.get("k_offset")
    what = f"{source}: layer {index} k_offset"
    k_offset = (
        None
        if offset is None
        else tuple(
            tuple(_number(v, f"{what}[{h}][{c}]") for c, v in enumerate(_list(head, f"{what}[{h}]")))
            for h, head in enumerate(_list(offset, what))
        )
    )
    return LayerAmax(
        index=index,
        k_amax=values["k_amax"],
        v_amax=values["v_amax"],
        layer_type=entry.get("layer_type", "full_attention"),
        k_amax_per_head=per_head["k_amax_per_head"],
        v_amax_per_head=per_head["v_amax_per_head"],
        k_offset=k_offset,
        k_format=_format(entry.get("k_format"), f"{source}: layer {index} k_format"),
        v_format=_format(entry.get("v_format"), f"{source}: layer {index} v_format"),
    )


def _format(value: Any, what: str) -> str | None:
    """A KV cache format name (lower-cased), or None when absent."""
    if value is None:
        return None
    from fp4kv_cli.quant.registry import KV_CACHE_METHOD_REGISTRY  # registry imports this module

    name = str(value).strip().lower()
    if name not in KV_CACHE_METHOD_REGISTRY:
        raise ScalesFileError(f"{what} is {value!r}; use one of {', '.join(KV_CACHE_METHOD_REGISTRY)}")
    return name


def _list(value: Any, what: str) -> list[Any] | tuple[Any, ...]:
    """``value`` when it is a JSON list, else a :class:`ScalesFileError` naming ``what``."""
    if not isinstance(value, (list, tuple)):
        raise ScalesFileError(f"{what} is {value!r}, not a list; re-run fp4kv calibrate")
    return value


def _number(value: Any, what: str) -> float:
    """``value`` as a float when it is a JSON number (not a string, list or bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
        raise ScalesFileError(f"{what} is {shown}, not a number; re-run fp4kv calibrate")
    return float(value)


def _positive(value: Any, what: str) -> float:
    if value is None:
        raise ScalesFileError(f"{what} is missing; re-run fp4kv calibrate")
    number = _number(value, what)
    if not math.isfinite(number) or number <= 0:
        raise ScalesFileError(f"{what} is {number}, amax must be finite and > 0; re-run fp4kv calibrate")
    return number


def load_scales_file(path: str | os.PathLike[str]) -> ScalesFile:
    """Read and validate ``scales.json`` at ``path``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScalesFileError(f"scales file {path} does not exist; make one with fp4kv calibrate") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ScalesFileError(f"cannot read scales file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ScalesFileError(f"{path} is not an fp4kv scales file; make one with fp4kv calibrate")
    return parse_scales(data, source=str(path))


def per_layer_amax(
    source: str | os.PathLike[str] | Mapping[str, Any] | ScalesFile,
) -> tuple[list[float], list[float]]:
    """K and V amax lists from a scales file path, a scales dict, a :class:`ScalesFile`, or a
    plain ``{"k_amax": [...], "v_amax": [...]}`` dict."""
    if isinstance(source, ScalesFile):
        return source.k_amax(), source.v_amax()
    if isinstance(source, Mapping):
        if "schema" in source:
            parsed = parse_scales(source)
            return parsed.k_amax(), parsed.v_amax()
        try:
            k = _list(source["k_amax"], "k_amax")
            v = _list(source["v_amax"], "v_amax")
        except KeyError:
            raise ScalesFileError("a scales dict needs 'k_amax' and 'v_amax' lists") from None
        k = [_positive(a, f"k_amax[{i}]") for i, a in enumerate(k)]
        v = [_positive(a, f"v_amax[{i}]") for i, a in enumerate(v)]
        return k, v
    parsed = load_scales_file(source)
    return parsed.k_amax(), parsed.v_amax()
