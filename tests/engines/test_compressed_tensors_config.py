"""compressed-tensors' own ``QuantizationConfig`` accepts the ``quantization_config`` fp4kv writes,
with the KV strategy that matches the exported scale shapes."""

from __future__ import annotations

import json

import pytest
from engines.engine_exports import ARCHS, LAYERS, Export
from safetensors import safe_open

quantization = pytest.importorskip("compressed_tensors.quantization", reason="pip install -e '.[engines]'")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("kind", "strategy"), [("ct-tensor", "tensor"), ("ct-head", "attn_head")])
def test_exported_config_validates(exports: dict[str, Export], arch: str, kind: str, strategy: str) -> None:
    exported = exports[f"{arch}-{kind}"]
    raw = json.loads((exported.path / "config.json").read_text())["quantization_config"]
    config = quantization.QuantizationConfig.model_validate(raw)
    scheme = config.kv_cache_scheme
    assert config.quant_method == "compressed-tensors" and config.config_groups == {}
    assert scheme.strategy == quantization.QuantizationStrategy(strategy)
    assert (scheme.num_bits, scheme.type, scheme.symmetric, scheme.dynamic) == (8, "float", True, False)
    # scale shapes as compressed-tensors initialises them: [1] per tensor, [num_kv_heads, 1, 1] per head
    want = (1,) if strategy == "tensor" else (2, 1, 1)
    with safe_open(str(exported.path / "model-fp4kv-kv-scales.safetensors"), framework="pt") as handle:
        for i in range(LAYERS):
            for side in "kv":
                assert tuple(handle.get_slice(f"model.layers.{i}.self_attn.{side}_scale").get_shape()) == want


def test_a_bad_strategy_is_refused(exports: dict[str, Export]) -> None:
    raw = json.loads((exports["llama-ct-head"].path / "config.json").read_text())["quantization_config"]
    raw["kv_cache_scheme"]["strategy"] = "head"
    with pytest.raises(ValueError, match="strategy"):
        quantization.QuantizationConfig.model_validate(raw)
