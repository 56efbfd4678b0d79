"""Read a model's config (KV shape) from a local folder, a GGUF file, or a hub id, without weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fp4kv_cli.errors import FP4KVError


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
        if not path.is_file():
            raise FP4KVError(f"GGUF file {path} does not exist; check the path")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    if path.exists() or model.startswith((".", "/", "~")):
        raise FP4KVError(f"{model} is not a model folder, config.json or .gguf file")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except OSError as err:
        raise FP4KVError(
            f"cannot load config of {model!r} (not a local path, and the hub said: {str(err).splitlines()[0]}); "
            "pass a local model folder or .gguf file"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FP4KVError(f"cannot read {path}: {err}") from None
