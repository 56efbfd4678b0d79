"""ModelOpt layout: ``k_proj.k_scale`` / ``v_proj.v_scale`` tensors, ``hf_quant_config.json`` and
the matching ``quantization_config`` in ``config.json``.

Layout read from NVIDIA/Model-Optimizer ``modelopt/torch/export/quant_utils.py``
(``postprocess_state_dict``, ``get_quant_config``) and ``convert_hf_config.py``
(``convert_hf_quant_config_format``). A KV-only ModelOpt export has ``quant_algo: null``, which
SGLang (``model_config._parse_modelopt_quant_config`` returns no method) and vLLM
(``ModelOptQuantConfigBase.from_config``: "Missing 'quant_algo'") do not load. So for BF16
weights fp4kv declares ``quant_algo`` = the KV dtype and excludes every Linear layer with
``EXCLUDE_ALL_LINEAR``, which each engine's matcher reads as "leave this layer unquantized".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from fp4kv_cli import __version__
from fp4kv_cli.export.names import modelopt_names
from fp4kv_cli.export.plan import LayerPlan
from fp4kv_cli.quant.formats import FP4_BLOCK_SIZE

#: Exclusion patterns that match every ``*_proj`` Linear (and lm_head) in each engine's matcher:
#: ``"*_proj"`` for fnmatch / regex-fullmatch matchers (vLLM, SGLang modelopt_fp4, TRT-LLM) and
#: ``"_proj"`` for the substring matcher of SGLang's modelopt_fp8 config. None matches the
#: attention module (``...self_attn.attn``), so the KV cache method is still attached.
EXCLUDE_ALL_LINEAR = ["*_proj", "_proj", "lm_head"]
#: ModelOpt releases whose NVFP4 KV scale convention the producer version states.
PRODUCER_VERSION = {"448": "0.42.0", "6x448": "0.40.0"}
KV_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
FP8_KV_SCHEME = {"dynamic": False, "num_bits": 8, "type": "float"}


def producer(convention: str) -> dict[str, str]:
    """ModelOpt producer block whose version implies ``convention``, tagged as fp4kv's."""
    return {"name": "modelopt", "version": f"{PRODUCER_VERSION[convention]}+fp4kv.{__version__}"}


def scale_tensors(plans: Sequence[LayerPlan], prefix: str) -> dict[str, torch.Tensor]:
    """fp32 scalar K/V scales (per-tensor: ModelOpt has no per-head KV scales)."""
    tensors = {}
    for plan in plans:
        k_name, v_name = modelopt_names(prefix, plan.index)
        tensors[k_name] = torch.tensor(plan.k_scale, dtype=torch.float32)
        tensors[v_name] = torch.tensor(plan.v_scale, dtype=torch.float32)
    return tensors


def hf_quant_config(existing: dict[str, Any] | None, kv_dtype: str, convention: str) -> dict[str, Any]:
    """``hf_quant_config.json``: the existing one with new KV fields, or a KV-only one."""
    config = copy.deepcopy(existing) if existing else {}
    config["producer"] = producer(convention)
    quantization = config.setdefault("quantization", {})
    if quantization.get("quant_algo") is None:
        quantization["quant_algo"] = KV_ALGO[kv_dtype]
        quantization["exclude_modules"] = list(EXCLUDE_ALL_LINEAR)
        if kv_dtype == "nvfp4":
            quantization["group_size"] = FP4_BLOCK_SIZE
    quantization["kv_cache_quant_algo"] = KV_ALGO[kv_dtype]
    return config


def quantization_config(hf_config: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """``config.json`` ``quantization_config`` in ModelOpt's flat form, plus the flat
    ``kv_cache_quant_algo`` and ``group_size`` that SGLang's ``ModelOptFp4Config.from_config``
    reads (its ``kv_cache_scheme.get`` would fail on ModelOpt's string ``"NVFP4"``)."""
    quant = hf_config["quantization"]
    algo, kv_algo = quant["quant_algo"], quant["kv_cache_quant_algo"]
    if existing:
        config = copy.deepcopy(existing)
    else:
        config = {"config_groups": _config_groups(algo, quant.get("group_size")), "quant_algo": algo}
    config["ignore"] = list(quant.get("exclude_modules") or config.get("ignore") or [])
    config["kv_cache_scheme"] = dict(FP8_KV_SCHEME) if kv_algo == "FP8" else kv_algo
    config["kv_cache_quant_algo"] = kv_algo
    if quant.get("group_size") is not None:
        config["group_size"] = quant["group_size"]
    config["producer"] = dict(hf_config["producer"])
    config["quant_method"] = "modelopt"
    return config


def _config_groups(algo: str, group_size: int | None) -> dict[str, Any]:
    if algo == "FP8":
        group = {"input_activations": dict(FP8_KV_SCHEME), "weights": dict(FP8_KV_SCHEME)}
    else:
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": group_size or FP4_BLOCK_SIZE}
        group = {"input_activations": dict(fp4), "weights": dict(fp4)}
    return {"group_0": {**group, "targets": ["Linear"]}}


def qkv_quantized(hf_config: dict[str, Any]) -> bool:
    """Whether the QKV projection keeps quantized weights (so TRT-LLM's FP8 QKV path loads KV scales)."""
    quant = hf_config.get("quantization", {})
    return quant.get("quant_algo") is not None and quant.get("exclude_modules") != EXCLUDE_ALL_LINEAR
