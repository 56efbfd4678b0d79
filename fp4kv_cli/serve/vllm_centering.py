"""K centering inside vLLM's attention layer (vLLM 0.26 to 0.32 tested).

:func:`install` wraps the ``Attention`` layer class once per process:

- ``__init__``: when the served folder's ``config.json`` carries fp4kv's marker, each decoder
  self-attention layer gets a non-persistent float32 buffer ``_fp4kv_k_offset`` (this rank's KV
  heads, created on the device the model is built on), after the offsets were checked against
  the model (layers, KV heads x head_dim). Without the marker nothing is added.
- ``forward``: ``key - _fp4kv_k_offset`` (plain torch ops, so torch.compile traces them into the
  graph piece before the attention custom op and CUDA graphs capture them) before the original
  forward, which writes the cache and attends; decode reads the stored centered K as it is.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from fp4kv_cli.serve.centering import (
    CenteringError,
    Offsets,
    center_key,
    check_offsets,
    layer_index,
    load_offsets,
    rank_heads,
    read_marker,
)

BUFFER = "_fp4kv_k_offset"
_PATCHED = "_fp4kv_centering_installed"
#: Attention modules of this process that got an offset: layer name -> decoder layer index.
CENTERED: dict[str, int] = {}
_OFFSETS: dict[str, Offsets | None] = {}


def attention_class() -> type:
    """vLLM's decoder ``Attention`` layer class (its module moved between releases)."""
    try:
        from vllm.model_executor.layers.attention.attention import Attention
    except ImportError:
        from vllm.attention.layer import Attention  # vLLM releases before the move
    return Attention


def install() -> bool:
    """Wrap ``Attention.__init__`` / ``forward`` (once); True if this call installed them."""
    cls = attention_class()
    if getattr(cls, _PATCHED, False):
        return False
    original_init, original_forward = cls.__init__, cls.forward

    @functools.wraps(original_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _attach(self)

    @functools.wraps(original_forward)
    def forward(
        self: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ):
        offset = getattr(self, BUFFER, None)
        if offset is not None and key is not None:
            key = center_key(key, offset)
        return original_forward(self, query, key, value, *args, **kwargs)

    cls.__init__, cls.forward = __init__, forward
    setattr(cls, _PATCHED, True)
    return True


def _attach(layer: Any) -> None:
    """Give ``layer`` its offset buffer if the served checkpoint asks for K centering."""
    from vllm.config import get_current_vllm_config

    model_config = get_current_vllm_config().model_config
    if model_config is None or getattr(layer, "attn_type", "decoder") != "decoder":  # a str enum
        return
    if getattr(layer, "kv_sharing_target_layer_name", None) is not None:
        return  # reads another layer's cache, which that layer centers
    offsets = _offsets_for(model_config)
    if offsets is None:
        return
    name = str(getattr(layer, "layer_name", ""))
    index = layer_index(name)
    if index is None:
        raise CenteringError(
            f"fp4kv: cannot tell the decoder layer of attention module {name!r}; "
            "K centering supports models whose layers are named layers.N"
        )
    offset = offsets.layers[index]
    if layer.head_size != offset.shape[1]:
        raise CenteringError(
            f"fp4kv: layer {index} attention has head_size {layer.head_size}, the K offset {offset.shape[1]}; "
            "export the scales calibrated on this model"
        )
    heads = rank_heads(offset.shape[0], layer.num_kv_heads, *_tp_rank())
    device = torch.empty(0).device  # the device vLLM builds the model on
    layer.register_buffer(BUFFER, offset[heads].contiguous().to(device), persistent=False)
    if not CENTERED:
        _log(f"fp4kv: K centering on; offsets from {offsets.folder}")
    CENTERED[name] = index


def _offsets_for(model_config: Any) -> Offsets | None:
    """The checked offsets of the served folder (cached per process), or None without a marker."""
    folder = Path(str(model_config.model))
    key = str(folder)
    if key not in _OFFSETS:
        entry = read_marker(folder) if folder.is_dir() else None
        offsets = None
        if entry is not None:
            offsets = load_offsets(folder, entry)
            check_offsets(
                offsets,
                _num_layers(model_config),
                int(model_config.get_total_num_kv_heads()),
                int(model_config.get_head_size()),
            )
        _OFFSETS[key] = offsets
    return _OFFSETS[key]


def _num_layers(model_config: Any) -> int:
    text = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    return int(text.num_hidden_layers)


def _tp_rank() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except AssertionError:  # no tensor-parallel group (e.g. a layer built outside an engine)
        return 0, 1


def _log(message: str) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.fp4kv").info(message)  # under "vllm": printed by its handlers


def centered_layers() -> dict[str, int]:
    """Attention layers of this process that store ``K - k_offset`` (name -> layer index)."""
    return dict(CENTERED)


def count_centered(model: Any) -> int:
    """Attention modules of ``model`` that carry a K offset (for ``LLM.apply_model``)."""
    return sum(1 for module in model.modules() if getattr(module, BUFFER, None) is not None)
