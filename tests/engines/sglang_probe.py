"""Load the KV scales of exported checkpoints with SGLang's own code, on CPU, and print what it got.

Run as a script (``python sglang_probe.py requests.json results.json``) in its own process: SGLang
is installed ``--no-deps`` and its config package imports ``torchvision`` (multimodal configs never
used here), which is not installed because a torchvision wheel that does not match the CPU torch
breaks transformers' import. A stand-in ``torchvision`` is importable only in this process, after
transformers has decided it has no torchvision.

Real SGLang code used for every checkpoint (sgl-project/sglang, the version pinned in
``scripts/install_engines.sh``):

- ``ModelConfig`` (``_parse_quant_hf_config``, ``_verify_quantization``) and ``get_quant_config``:
  which quant config a checkpoint gets for a ``--quantization`` flag;
- ``QuantizationConfig.get_quant_method`` for each Linear prefix and for ``RadixAttention``;
- ``RadixAttention`` with its KV method's ``create_weights`` / ``process_weights_after_loading``;
- ``LlamaForCausalLM._legacy_load_weights`` / ``Qwen2ForCausalLM.load_weights`` (the default
  loader), with ``maybe_remap_kv_scale_name``, ``default_weight_loader``,
  ``filter_duplicate_safetensors_files`` and ``safetensors_weights_iterator``;
- ``NVFP4KVCacheMethod.load_scales_from_model`` (the x6 on sm100) under ``override_platform``;
- ``kv_cache_scales_loader`` for ``--quantization-param-path``.

Not real: the model object. SGLang's model classes need its distributed groups and kernels to be
built, so the load loop runs on a stand-in that has the checkpoint's fused parameter names (their
loaders ignore the weights) and the real ``RadixAttention`` modules under ``...self_attn.attn``.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import json
import os
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import torch

FUSED = [
    (".qkv_proj", (".q_proj", ".k_proj", ".v_proj")),
    (".gate_up_proj", (".gate_proj", ".up_proj")),
]
LINEAR = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty ``torchvision`` package: every public attribute is a fresh class."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] != "torchvision":
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attribute(name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

        module.__getattr__ = attribute  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def import_sglang() -> dict[str, Any]:
    import transformers.image_utils  # noqa: F401  (decides "no torchvision" before the stand-in)

    sys.meta_path.insert(0, _StandIn())
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.linear import LinearBase
    from sglang.srt.layers.quantization.fp4_kv_cache_quant_method import NVFP4KVCacheMethod
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_loader import weight_utils
    from sglang.srt.models.llama import LlamaForCausalLM
    from sglang.srt.models.qwen2 import Qwen2ForCausalLM
    from sglang.srt.runtime_context import override_platform

    return {
        "LoadConfig": LoadConfig,
        "ModelConfig": ModelConfig,
        "LinearBase": LinearBase,
        "NVFP4KVCacheMethod": NVFP4KVCacheMethod,
        "RadixAttention": RadixAttention,
        "weight_utils": weight_utils,
        "models": {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM},
        "override_platform": override_platform,
    }


def _fused(name: str) -> str:
    for fused, parts in FUSED:
        for part in parts:
            if part in name:
                return name.replace(part, fused)
    return name


def _ignore(param: torch.Tensor, loaded: torch.Tensor, shard_id: Any = None) -> None:
    return None


class _Model:
    """What SGLang's load loop touches on the model: parameters by name, config, ``model``."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self._params = params
        self.config = types.SimpleNamespace(tie_word_embeddings=False)
        self.model = types.SimpleNamespace()

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return list(self._params.items())


def probe(sgl: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """What SGLang does with the KV scales of one checkpoint (see module docstring)."""
    path, layers = request["path"], request["num_layers"]
    utils = sgl["weight_utils"]
    result: dict[str, Any] = {"id": request["id"]}
    if request.get("param_path"):
        loaded = utils.kv_cache_scales_loader(request["param_path"], 0, 1, layers, request["model_type"])
        result["param_path_scales"] = [[layer, float(scale)] for layer, scale in loaded]
        return result
    config = sgl["ModelConfig"](path, quantization=request.get("quantization"))
    result["quantization"] = config.quantization
    model_cls = sgl["models"][request["model_type"]]
    packed = getattr(model_cls, "packed_modules_mapping", {})
    quant = utils.get_quant_config(config, sgl["LoadConfig"](), packed) if config.quantization else None
    result["quant_config"] = None if quant is None else type(quant).__name__
    linear = sgl["LinearBase"].__new__(sgl["LinearBase"])
    methods = {}
    if quant is not None:
        for i in range(layers):
            for suffix in LINEAR:
                prefix = f"model.layers.{i}.{suffix}"
                method = quant.get_quant_method(linear, prefix)
                methods[prefix] = None if method is None else type(method).__name__
    result["linear_methods"] = methods
    heads = json.loads((Path(path) / "config.json").read_text())
    attention = [
        sgl["RadixAttention"](
            num_heads=heads["num_attention_heads"],
            head_dim=heads.get("head_dim") or heads["hidden_size"] // heads["num_attention_heads"],
            scaling=1.0,
            num_kv_heads=heads["num_key_value_heads"],
            layer_id=i,
            quant_config=quant,
            prefix=f"model.layers.{i}.self_attn.attn",
        )
        for i in range(layers)
    ]
    result["attention_method"] = (
        type(attention[0].quant_method).__name__ if attention[0].quant_method else None
    )
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    files = utils.filter_duplicate_safetensors_files(files, path, "model.safetensors.index.json")
    params: dict[str, torch.nn.Parameter] = {}
    for name, _ in utils.safetensors_weights_iterator(files):
        if name.endswith(("_scale", "k_offset")) or "_scale" in name:
            continue
        param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        param.weight_loader = _ignore  # type: ignore[attr-defined]
        params[_fused(name)] = param
    for i, attn in enumerate(attention):
        for name, param in attn.named_parameters():
            params[f"model.layers.{i}.self_attn.attn.{name}"] = param
    loader = getattr(model_cls, "_legacy_load_weights", None) or model_cls.load_weights
    loader(_Model(params), utils.safetensors_weights_iterator(files))
    for attn in attention:
        if attn.quant_method is not None:
            attn.quant_method.process_weights_after_loading(attn)
    if request.get("kv_cache_dtype") == "nvfp4":
        result["scales"] = _nvfp4_scales(sgl, attention, request["sm"])
    else:
        # Without a KV method RadixAttention keeps k_scale None and the KV pool does not divide by
        # it (memory_pool.py ``set_kv_buffer``): scale 1.0.
        result["scales"] = [[_or_one(a.k_scale_float), _or_one(a.v_scale_float)] for a in attention]
    return result


def _or_one(value: float | None) -> float:
    return 1.0 if value is None else value


def _nvfp4_scales(sgl: dict[str, Any], attention: list[Any], sm: int) -> list[list[float]]:
    """``NVFP4KVCacheMethod.load_scales_from_model`` on these layers, on the given GPU family."""
    method = sgl["NVFP4KVCacheMethod"].__new__(sgl["NVFP4KVCacheMethod"])
    n = len(attention)
    method.device = "cpu"
    method.k_scales_gpu, method.v_scales_gpu = torch.ones(n), torch.ones(n)
    method.k_scales_float, method.v_scales_float = [1.0] * n, [1.0] * n
    runner = types.SimpleNamespace(
        model=types.SimpleNamespace(
            layers=[types.SimpleNamespace(self_attn=types.SimpleNamespace(attn=a)) for a in attention]
        )
    )
    with sgl["override_platform"](is_sm100=sm == 100):
        method.load_scales_from_model(runner)
    return [[k, v] for k, v in zip(method.k_scales_float, method.v_scales_float)]


def main() -> None:
    requests = json.loads(Path(sys.argv[1]).read_text())
    sgl = import_sglang()
    results = []
    for request in requests:
        try:
            results.append(probe(sgl, request))
        except Exception as err:  # noqa: BLE001 (the engine's own refusal is a result)
            results.append(
                {
                    "id": request["id"],
                    "error": f"{type(err).__name__}: {err}",
                    "trace": traceback.format_exc(),
                }
            )
    Path(sys.argv[2]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
