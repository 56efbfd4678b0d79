"""Exported checkpoints the real-engine tests load: a tiny Llama and a tiny sharded Qwen2 (head_dim
32, which vLLM's CPU fp8 KV cache needs), each run through ``fp4kv export-scales`` in every
layout vLLM reads. Built once per session; the engines themselves start in the test modules."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_loaders.fixtures import scales_dict, write_scales
from typer.testing import CliRunner

from fp4kv_cli.cli import app

# In-process vLLM engine with a small KV cache (read before vllm is imported).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

LAYERS = 2
ARCHS = ("llama", "qwen2")
#: ModelOpt KV-only checkpoint as ModelOpt itself writes it (quant_algo null).
MODELOPT_KV_ONLY = {
    "producer": {"name": "modelopt", "version": "0.35.0"},
    "quantization": {"quant_algo": None, "kv_cache_quant_algo": "FP8"},
}


@dataclass(frozen=True)
class Export:
    """One ``export-scales`` run: how it was asked for, where it went and its report."""

    arch: str
    kind: str
    path: Path
    report: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.kind}"

    def consumer(self, engine: str) -> dict[str, Any]:
        """The report's entry for ``engine`` (one per engine for FP8 exports)."""
        (found,) = [c for c in self.report["consumers"] if c["engine"] == engine]
        return found


#: kind -> (export-scales options, scales file has per-head amax, source has hf_quant_config.json)
KINDS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    # compressed-tensors kv_cache_scheme, strategy tensor / attn_head
    "ct-tensor": (("--format", "compressed-tensors", "--per-tensor"), True, False),
    "ct-head": (("--format", "compressed-tensors"), True, False),
    # ModelOpt quantization_config in config.json (+ hf_quant_config.json), per-head amax reduced
    "mo-config": (("--format", "modelopt"), True, False),
    # ModelOpt hf_quant_config.json only (the source was a ModelOpt KV-only checkpoint)
    "mo-hfquant": (("--format", "modelopt"), False, True),
}


def save_model(arch: str, folder: Path) -> Path:
    """Tiny random Llama (one file) or Qwen2 (k_proj bias, several shards): 2 layers, 4 query /
    2 KV heads of head_dim 32, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = {
        "vocab_size": 128,
        "hidden_size": 128,
        "intermediate_size": 128,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    if arch == "llama":
        LlamaForCausalLM(LlamaConfig(**shape, head_dim=32)).save_pretrained(folder)
    else:
        Qwen2ForCausalLM(Qwen2Config(**shape)).save_pretrained(folder, max_shard_size="100KB")
    return folder


def export(model: Path, scales: Path, out: Path, *args: str) -> dict[str, Any]:
    """Run ``fp4kv export-scales --kv-dtype fp8`` and return its report."""
    result = CliRunner().invoke(
        app,
        [
            "export-scales",
            str(scales),
            "--model-dir",
            str(model),
            "--out",
            str(out),
            "--kv-dtype",
            "fp8",
            *args,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "fp4kv_kv_scales.json").read_text())


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> plain model folder; arch + "-modelopt" -> the same with a KV-only hf_quant_config.json."""
    root = tmp_path_factory.mktemp("engine_models")
    folders = {}
    for arch in ARCHS:
        plain = save_model(arch, root / arch)
        with_hf = root / f"{arch}-modelopt"
        shutil.copytree(plain, with_hf)
        (with_hf / "hf_quant_config.json").write_text(json.dumps(MODELOPT_KV_ONLY))
        folders[arch], folders[f"{arch}-modelopt"] = plain, with_hf
    return folders


@pytest.fixture(scope="session")
def exports(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Export]:
    """``"<arch>-<kind>"`` -> the export of that model in that layout."""
    root = tmp_path_factory.mktemp("engine_exports")
    found = {}
    for arch in ARCHS:
        for kind, (args, per_head, hf_quant) in KINDS.items():
            model = models[f"{arch}-modelopt" if hf_quant else arch]
            scales = write_scales(root / f"{arch}-{kind}.json", scales_dict(model, per_head=per_head))
            out = root / f"{arch}-{kind}"
            found[f"{arch}-{kind}"] = Export(arch, kind, out, export(model, scales, out, *args))
    return found
