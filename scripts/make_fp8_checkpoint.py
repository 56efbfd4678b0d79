#!/usr/bin/env python3
"""Write an FP8-weight copy of a bf16 Hugging Face checkpoint, quantized by compressed-tensors
itself (the ``float-quantized`` format vLLM and llm-compressor use): every decoder Linear's
weights FP8 E4M3 per output channel (``amax / 448``), activations dynamic per token, lm_head kept.
The reference FP8-weight checkpoint for calibrating KV scales on the weights that are deployed.

    python3 scripts/make_fp8_checkpoint.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch


def make_fp8_checkpoint(source: Path, out: Path) -> Path:
    """``source`` (a bf16/fp32 HF folder) as a compressed-tensors FP8-weight folder at ``out``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                quantization_status="frozen", format="float-quantized")  # fmt: skip
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                amax = module.weight.abs().amax(dim=1, keepdim=True).float()
                module.weight_scale.copy_((amax / 448).to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for item in Path(source).iterdir():  # tokenizer files
        if item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(item, Path(out) / item.name)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    if args.out_dir.exists():
        raise SystemExit(f"error: {args.out_dir} exists; pass a new OUT_DIR")
    started = time.perf_counter()
    make_fp8_checkpoint(args.model_dir, args.out_dir)
    print(f"wrote {args.out_dir} (compressed-tensors FP8 weights) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
