"""Loading decoder LLMs for calibration and evaluation: a local HF folder, a ``.gguf`` file
(dequantized by transformers), or a hub id; plus GGUF -> reusable HF folder conversion."""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from fp4kv_cli.atomic import atomic_path
from fp4kv_cli.errors import FP4KVError, is_out_of_memory
from fp4kv_cli.validate import GGUF_PARSE_ERRORS, check_causal_lm, check_output_path, gguf_error, locate_model

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
DEVICES = ("auto", "cpu", "cuda")
#: accelerate's placement strategies that ``--device-map`` accepts.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
#: What transformers raises for model files it cannot load (missing, corrupt, cut short).
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name == "cuda" or name.startswith("cuda:")):
        raise FP4KVError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FP4KVError(f"device {name} asked for but CUDA is not available; use --device cpu")
    return torch.device(name)


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """Model dtype for ``"bf16"`` / ``"fp16"`` / ``"fp32"``; ``"auto"`` is bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        on_cuda = (device.type if device is not None else resolve_device("auto").type) == "cuda"
        return torch.bfloat16 if on_cuda else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise FP4KVError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}") from None


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """accelerate's ``max_memory`` from ``"0=20GiB,1=20GiB,cpu=64GiB"`` (GPU index or ``cpu`` =
    a size accelerate reads: ``20GiB``, ``500MB``, ...); None for None or an empty string."""
    if not text:
        return None
    limits: dict[int | str, str] = {}
    for part in text.split(","):
        where, _, size = part.strip().partition("=")
        where, size = where.strip(), size.strip()
        if not size or not (where.isdigit() or where in ("cpu", "mps", "disk")):
            raise FP4KVError(
                f"--max-memory entry {part.strip()!r} is not DEVICE=SIZE; write e.g. 0=20GiB,cpu=64GiB"
            )
        limits[int(where) if where.isdigit() else where] = size
    return limits


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a forward's inputs go: the device of the input embeddings' execution (accelerate
    moves activations between the devices of a placed model itself); offloaded weights run on CPU."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        return torch.device("cpu" if first in ("disk", "cpu") else first if isinstance(first, str) else f"cuda:{first}")
    return next(model.parameters()).device


def placed_devices(model: torch.nn.Module) -> list[str]:
    """The distinct devices accelerate placed ``model`` on, in order (``disk`` included); one
    entry for a model on a single device."""
    device_map = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    names = [v if isinstance(v, str) else f"cuda:{v}" for v in device_map.values()]
    return list(dict.fromkeys(names))


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV cache argument of ``model.forward``: ``"cache"`` (transformers >= 5.2x)
    or ``"past_key_values"`` (earlier)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def load_model_and_tokenizer(
    model: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    device_map: str | None = None,
    max_memory: str | dict[int | str, str] | None = None,
) -> tuple[Any, Any]:
    """Load a decoder LLM and its tokenizer, ready for batched left-padded forwards.

    Parameters
    ----------
    model
        A local Hugging Face folder, a ``.gguf`` file (its weights are dequantized to ``dtype``),
        or a hub id (needs the hub).
    device
        ``"auto"`` / ``"cpu"`` / ``"cuda"`` or a ``torch.device``.
    dtype
        ``"auto"`` / ``"bf16"`` / ``"fp16"`` / ``"fp32"`` or a ``torch.dtype``.
    device_map
        None: the whole model on ``device``. ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` /
        ``"sequential"``: accelerate places the layers over the GPUs (and CPU, then disk, when
        they do not fit ``max_memory``); ``device`` is then unused.
    max_memory
        accelerate's per-device limits with a ``device_map``: a dict, or text for
        :func:`parse_max_memory`.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode on ``device`` (or placed by accelerate, see :func:`input_device`); the tokenizer with a pad token (eos if it had
        none) and ``padding_side="left"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    placement = _placement(device_map, max_memory)
    location, kwargs = locate_model(model)
    config = _load_config(model, location, kwargs)
    check_causal_lm(config, model)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # callers show their own progress; tqdm bars would interleave
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs, **placement)
    except ImportError as err:  # a quantized checkpoint whose library is missing (compressed-tensors, ...)
        raise FP4KVError(f"cannot load model {model}: {_first_line(err)}; install the package it names") from None
    except (*GGUF_PARSE_ERRORS, OSError, RuntimeError, EOFError, SafetensorError) as err:
        if "gguf_file" in kwargs and isinstance(err, GGUF_PARSE_ERRORS):
            raise gguf_error(model, err) from None
        if is_out_of_memory(err) or not isinstance(err, LOAD_ERRORS):
            raise
        raise FP4KVError(f"cannot load model {model}: {_first_line(err)}; check the files") from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if not placement:
        loaded.to(device)
    loaded.eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FP4KVError(
                f"tokenizer of {model} has neither a pad nor an eos token; add one to the tokenizer"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return loaded, tokenizer


def convert_gguf_to_folder(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Dequantize a ``.gguf`` model into a reusable Hugging Face folder (model + tokenizer), atomically.

    Loading the folder afterwards takes seconds instead of re-dequantizing the GGUF.
    """
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if gguf_path.suffix != ".gguf":
        raise FP4KVError(f"{gguf_path} is not a .gguf file; pass a GGUF model file")
    if out_dir.exists() and not overwrite:
        raise FP4KVError(f"{out_dir} already exists; pass --overwrite or another --out")
    check_output_path(out_dir, "--out", folder=True)
    model, tokenizer = load_model_and_tokenizer(str(gguf_path), device="cpu", dtype=dtype)
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model with the marker set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def _placement(device_map: str | None, max_memory: str | dict[int | str, str] | None) -> dict[str, Any]:
    """``from_pretrained`` kwargs that let accelerate place the model (empty without a device map)."""
    if device_map is None:
        if max_memory:
            raise FP4KVError("--max-memory needs --device-map; add --device-map auto (or balanced, sequential)")
        return {}
    if device_map not in DEVICE_MAPS:
        raise FP4KVError(f"unknown --device-map {device_map!r}; use one of {', '.join(DEVICE_MAPS)}")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise FP4KVError("--device-map needs accelerate; pip install accelerate")
    limits = parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory
    return {"device_map": device_map, "max_memory": limits, "offload_folder": _offload_folder()}


@functools.cache
def _offload_folder() -> str:
    """One temporary folder per process for weights accelerate offloads to disk, removed at exit."""
    folder = tempfile.mkdtemp(prefix="fp4kv-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _load_config(model: str, location: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except (*GGUF_PARSE_ERRORS, OSError) as err:
        if "gguf_file" in kwargs and isinstance(err, GGUF_PARSE_ERRORS):
            raise gguf_error(model, err) from None
        if not isinstance(err, (OSError, ValueError, KeyError)):
            raise
        where = (
            "local files" if Path(location).exists()
            else "the local hub cache (the hub is unreachable)" if kwargs.get("local_files_only")
            else "the hub"
        )
        raise FP4KVError(
            f"cannot load config of {model} from {where}: {_first_line(err)}; pass a local model folder or .gguf file"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
