"""Read a model's config (KV shape) from a local folder, a GGUF file, or a hub id, without weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.validate import (
    GGUF_PARSE_ERRORS,
    check_gguf_file,
    gguf_error,
    hub_kwargs,
    looks_local,
    missing_model,
)


@dataclass(frozen=True)
class KVShape:
    """What sizes a model's KV cache: attention layers, KV heads and head_dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KVShape:
        """Derive the KV shape from a ``config.json`` dict (text_config of multimodal configs)."""
        if not isinstance(config, dict):
            raise FP4KVError(
                f"the model config is a JSON {type(config).__name__}, not an object; pass a model's config.json"
            )
        cfg = config.get("text_config") or config
        try:
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
        except (KeyError, TypeError):
            raise FP4KVError(
                "config has no num_attention_heads / num_hidden_layers; is this a decoder LLM config?"
            ) from None
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        return cls(layers, int(kv_heads), int(head_dim), str(cfg.get("model_type", "unknown")))


def load_config_dict(model: str) -> dict[str, Any]:
    """The ``config.json`` dict of ``model``: a folder, a ``config.json`` path, a ``.gguf`` file,
    or a hub id (needs access to the hub)."""
    path = Path(model)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FP4KVError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        return _read_json(config_path)
    if path.suffix == ".json" and path.is_file():
        return _read_json(path)
    if path.suffix == ".gguf":
        check_gguf_file(path)
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
        except GGUF_PARSE_ERRORS as err:
            raise gguf_error(path, err) from None
    if path.exists():
        raise FP4KVError(f"{model} is not a model folder, config.json or .gguf file")
    if looks_local(model):
        raise missing_model(model)
    kwargs = hub_kwargs(model)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, **kwargs).to_dict()
    except (OSError, ValueError) as err:
        said = (
            "the hub is unreachable and it is not in the local hub cache"
            if kwargs.get("local_files_only")
            else f"the hub said: {str(err).strip().splitlines()[0]}"
        )
        raise FP4KVError(
            f"cannot load config of {model!r} (not a local path; {said}); pass a local model folder or .gguf file"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or not UTF-8 text
        raise FP4KVError(f"cannot read {path}: {err}; pass a model's config.json") from None
    if not isinstance(data, dict):
        raise FP4KVError(f"{path} holds a JSON {type(data).__name__}, not an object; pass a model's config.json")
    return data
