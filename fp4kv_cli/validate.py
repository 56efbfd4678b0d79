"""Checks of user input that commands run before any work or output: writable output paths,
GGUF files, model configs (a causal LM with a KV cache), local-looking model paths.

Each check raises :class:`FP4KVError` with ``<problem>; <fix>``. This module imports neither
torch nor transformers at import time.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fp4kv_cli.errors import FP4KVError

GGUF_MAGIC = b"GGUF"
#: magic, version (u32), tensor count (u64), metadata count (u64).
GGUF_HEADER = struct.Struct("<4sIQQ")
#: Errors the GGUF reader (gguf-py, inside transformers) raises on a truncated or corrupt file.
GGUF_PARSE_ERRORS = (struct.error, ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError)
#: A Hugging Face hub id: ``name`` or ``owner/name`` of letters, digits, ``-``, ``_``, ``.``.
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
#: Seconds the hub may take to accept a connection before models load from the local cache only.
HUB_PROBE_SECONDS = 3.0
#: File endings of local model files, never of hub ids.
LOCAL_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".pt", ".pth")


def check_output_path(path: str | os.PathLike[str], option: str = "--out", folder: bool = False) -> Path:
    """``path`` as a Path, once the folder it goes in exists or can be made and takes new files.

    Probes with a temporary file in the nearest existing folder, so ``/proc/x.json`` or a
    read-only mount fail here, before any calibration or export runs. ``folder``: ``path`` is
    an output folder (written beside itself, then renamed); else a file, not an existing folder.
    """
    path = Path(path).expanduser()
    if not folder and path.is_dir():
        raise FP4KVError(f"{option} {path} is a folder; pass a file path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FP4KVError(f"{option} {path}: {parent} is not a folder; pass a path in a writable folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".fp4kv-write-test.", dir=parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise FP4KVError(
            f"cannot write {option} {path}: {parent} does not take new files ({err.strerror or err}); "
            "pass a path in a writable folder"
        ) from None
    return path


def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """``path`` once it is an existing file starting with a whole GGUF header."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FP4KVError(f"GGUF file {path} does not exist; check the path or run scripts/fetch_model.py")
    with path.open("rb") as handle:
        head = handle.read(GGUF_HEADER.size)
    if head[:4] != GGUF_MAGIC:
        raise FP4KVError(f"{path} is not a GGUF file (no GGUF magic bytes); pass a .gguf model file")
    if len(head) < GGUF_HEADER.size:
        raise FP4KVError(f"{path} is truncated ({path.stat().st_size} bytes); download it again")
    return path


def gguf_error(path: str | os.PathLike[str], err: BaseException) -> FP4KVError:
    """The one-line error for a GGUF file whose contents the reader could not parse."""
    lines = str(err).strip().splitlines()
    name = "struct.error" if isinstance(err, struct.error) else type(err).__name__
    detail = f"{name}: {lines[0]}" if lines else name
    return FP4KVError(
        f"cannot read GGUF file {path} ({detail}); the file is truncated or corrupt: download it again"
    )


def check_causal_lm(config: Any, model: str) -> None:
    """Refuse configs that are not a decoder-only causal LM with a KV cache: encoder-decoders,
    and encoder families (BERT, RoBERTa, ...) not configured as decoders.

    ``config`` is a ``config.json`` dict or a transformers config object.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = config if isinstance(config, Mapping) else config.to_dict()
    model_type = config.get("model_type")
    kind = None
    if config.get("is_encoder_decoder", False):
        kind = "an encoder-decoder"
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder", False):
        kind = "an encoder: no KV cache"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "not a causal LM"
    if kind is not None:
        raise FP4KVError(
            f"{model} is a {model_type} model ({kind}); pass a decoder LLM that has a KV cache (a causal "
            "LM: Llama, Qwen2, Qwen3, Mistral, ...)"
        )


def looks_local(model: str) -> bool:
    """Whether ``model`` can only be a local path (not a hub id): it starts with ``.``, ``/`` or
    ``~``, ends in a model file suffix, its first part is a local folder (``models/x``), or it
    has more than one ``/`` or other characters no hub id has."""
    return (
        model.startswith((".", "/", "~"))
        or "/" in model
        and Path(model.split("/")[0]).is_dir()
        or model.endswith(LOCAL_SUFFIXES)
        or os.sep != "/"
        and os.sep in model
        or not HUB_ID.match(model)
        or "--" in model
        or ".." in model
    )


def hub_kwargs(model: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs for hub id ``model``: ``local_files_only`` (the local hub cache,
    no retries) when the hub cannot be reached within :data:`HUB_PROBE_SECONDS`, else none.

    Unreachable hub and no cached ``config.json``: the one-line error at once (a hub lookup
    would retry for half a minute).
    """
    if hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise FP4KVError(
            f"{model} is not a local path, the hub ({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}) "
            "is unreachable and the local hub cache does not hold it; pass a local model folder or .gguf file"
        )
    return {"local_files_only": True}


@functools.cache
def hub_reachable() -> bool:
    """Whether the hub (``HF_ENDPOINT``, default huggingface.co) answers a TCP connect quickly;
    False at once under ``HF_HUB_OFFLINE``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection(
            (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)),
            timeout=HUB_PROBE_SECONDS,
        ):
            return True
    except OSError:
        return False


def locate_model(model: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` location and extra kwargs (``gguf_file``, ``local_files_only``) for
    ``model``: a local folder, a ``.gguf`` file or a hub id; a missing local path, a bad GGUF
    header or an unreachable hub fail here, in well under a second."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FP4KVError(f"{path} has no config.json; pass a Hugging Face model folder or a .gguf file")
        return str(path), {}
    if path.suffix == ".gguf":
        check_gguf_file(path)
        import importlib.util

        if importlib.util.find_spec("gguf") is None:
            raise FP4KVError("loading a .gguf file needs the gguf package; pip install gguf")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        raise FP4KVError(f"{model} is not a model folder or .gguf file; pass one, or a hub id")
    if looks_local(model):
        raise missing_model(model)
    return model, hub_kwargs(model)


def missing_model(model: str) -> FP4KVError:
    """The one-line error for a local-looking model path that does not exist."""
    return FP4KVError(
        f"{model} does not exist (looked for a local folder or file, not the hub); check the path "
        "or run scripts/fetch_model.py"
    )
