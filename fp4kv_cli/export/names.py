"""Checkpoint tensor names of KV scales: the ones fp4kv writes and every kind it recognises.

Written names (per attention layer ``N`` under the model's layer prefix ``P``):

- ModelOpt: ``P.N.self_attn.k_proj.k_scale`` / ``P.N.self_attn.v_proj.v_scale``
- compressed-tensors (llm-compressor): ``P.N.self_attn.k_scale`` / ``P.N.self_attn.v_scale``
- fp4kv K offset: ``P.N.self_attn.k_proj.k_offset`` (kept out of the index, see ``docs/export.md``)
- ModelOpt affine-KV K bias (``--k-centering modelopt``): ``P.N.self_attn.k_proj.k_bias``

Also recognised when reading: legacy ``P.N.self_attn.kv_scale`` (one scale for K and V),
old llm-compressor ``P.N.self_attn.{k,v}_proj.output_scale`` and ModelOpt affine-KV biases
``P.N.self_attn.{k,v}_proj.{k,v}_bias``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_LAYER_PREFIX = "model.layers"

_KV_NAME = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<layer>\d+)\.self_attn\.(?P<rest>[a-z_.]+)$")
_ATTN_WEIGHT = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.\d+\.self_attn\.")

#: rest of the name -> (which tensor, naming family)
KV_SUFFIXES: dict[str, tuple[str, str]] = {
    "k_proj.k_scale": ("k", "modelopt"),
    "v_proj.v_scale": ("v", "modelopt"),
    "k_scale": ("k", "compressed-tensors"),
    "v_scale": ("v", "compressed-tensors"),
    "k_proj.output_scale": ("k", "compressed-tensors (output_scale)"),
    "v_proj.output_scale": ("v", "compressed-tensors (output_scale)"),
    "kv_scale": ("kv", "legacy kv_scale"),
    "k_proj.k_offset": ("k_offset", "fp4kv"),
    "k_proj.k_bias": ("k_bias", "modelopt affine"),
    "v_proj.v_bias": ("v_bias", "modelopt affine"),
}


@dataclass(frozen=True)
class KVName:
    """A recognised KV tensor name split into its parts."""

    name: str
    prefix: str
    layer: int
    role: str
    family: str


def parse_kv_name(name: str) -> KVName | None:
    """Recognise a KV scale / offset tensor name, or return ``None``."""
    match = _KV_NAME.match(name)
    if match is None or match["rest"] not in KV_SUFFIXES:
        return None
    role, family = KV_SUFFIXES[match["rest"]]
    return KVName(name, match["prefix"], int(match["layer"]), role, family)


def layer_prefix(weight_names: Iterable[str]) -> str:
    """The prefix before ``.N.self_attn.`` in a model's weight names (``model.layers`` for Llama,
    ``model.language_model.layers`` for some multimodal models)."""
    for name in weight_names:
        match = _ATTN_WEIGHT.match(name)
        if match is not None:
            return match["prefix"]
    return DEFAULT_LAYER_PREFIX


def modelopt_names(prefix: str, layer: int) -> tuple[str, str]:
    """ModelOpt K and V scale names of ``layer``."""
    return f"{prefix}.{layer}.self_attn.k_proj.k_scale", f"{prefix}.{layer}.self_attn.v_proj.v_scale"


def compressed_tensors_names(prefix: str, layer: int) -> tuple[str, str]:
    """compressed-tensors K and V scale names of ``layer``."""
    return f"{prefix}.{layer}.self_attn.k_scale", f"{prefix}.{layer}.self_attn.v_scale"


def k_offset_name(prefix: str, layer: int) -> str:
    """fp4kv K offset name of ``layer``."""
    return f"{prefix}.{layer}.self_attn.k_proj.k_offset"


def k_bias_name(prefix: str, layer: int) -> str:
    """ModelOpt affine-KV K bias name of ``layer``."""
    return f"{prefix}.{layer}.self_attn.k_proj.k_bias"
