"""Q/K Hadamard rotation: the matrix, score invariance, the cache's store and read paths with
centering, the fused read's rotated query, calibration of the stored K's amax, and the storage the
eval builds from a rotated scales file."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_calibrate import TEXTS, reference_kv

from fp4kv_cli import fused_attention
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.calibration import calibrate
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.runner import cache_factory
from fp4kv_cli.models import cache_argument, load_model_and_tokenizer
from fp4kv_cli.quant import reference
from fp4kv_cli.quant.methods import BF16KVMethod
from fp4kv_cli.quant.registry import get_kv_cache_method
from fp4kv_cli.quant.rotation import QKRotation, hadamard_matrix
from fp4kv_cli.quant.scales import ScalesFileError, parse_scales
from fp4kv_cli.quant.storage import KVStorage, LayerStorage

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("size", [2, 4, 16, 64, 128])
def test_hadamard_is_the_normalized_sylvester_matrix_and_its_own_inverse(size: int) -> None:
    h = hadamard_matrix(size).double()
    signs = torch.tensor([[(-1) ** (i & j).bit_count() for j in range(size)] for i in range(size)])
    assert torch.equal(torch.sign(h), signs.double())  # Sylvester order
    assert torch.equal(h.abs(), torch.full_like(h, size**-0.5).float().double())  # +-1/sqrt(n) in fp32
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h @ h, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-6)
    if size > 2:  # Sylvester: H_2n = [[H, H], [H, -H]] / sqrt(2)
        half = hadamard_matrix(size // 2).double()
        torch.testing.assert_close(
            h, torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)]) / 2**0.5
        )


def test_block_rotation_is_block_diagonal_keeps_scores_and_undoes_itself() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 4, 64, generator=gen), torch.randn(3, 9, 64, generator=gen) * 5
    for block in (16, 64):
        rotation = QKRotation(block)
        blocks = torch.block_diag(*[hadamard_matrix(block)] * (64 // block))
        torch.testing.assert_close(rotation.apply(k), k @ blocks, rtol=0, atol=1e-5)
        torch.testing.assert_close(rotation.apply(q) @ rotation.apply(k).transpose(1, 2), q @ k.transpose(1, 2),
                                   rtol=0, atol=1e-4)  # fmt: skip
        torch.testing.assert_close(rotation.apply(rotation.apply(k)), k, rtol=0, atol=1e-5)
    spiky = torch.zeros(1, 64)
    spiky[0, 5] = 16.0  # one outlier channel spreads over its whole block
    assert QKRotation(16).apply(spiky).abs().max() == pytest.approx(4.0)


def test_parse_and_bad_blocks() -> None:
    assert QKRotation.parse("16") == QKRotation(16)
    assert QKRotation.parse("head_dim", 128) == QKRotation(128)
    for bad in ("12", "1", "x"):
        with pytest.raises(FP4KVError, match="--qk-rotation"):
            QKRotation.parse(bad)
    with pytest.raises(FP4KVError, match="does not divide head_dim 48"):
        QKRotation(32).apply(torch.zeros(2, 48))
    assert QKRotation.from_dict(QKRotation(16).to_dict()) == QKRotation(16)


def test_cache_stores_rotated_centered_k_and_reads_it_back_unrotated() -> None:
    """Centering, then rotation: the buffers hold the nvfp4 bytes of ``(K - offset) @ H`` (V is not
    rotated), the gather read is those values rotated back, the fused read's query is ``q @ H``."""
    gen = torch.Generator().manual_seed(1)
    b, h, t, d = 2, 2, 5, 32
    k, v = torch.randn(b, h, t, d, generator=gen) * 3 + 2, torch.randn(b, h, t, d, generator=gen)
    offsets = torch.randn(1, h, d, generator=gen)
    g = torch.tensor(0.004)
    rotation = QKRotation(16)
    method = get_kv_cache_method("nvfp4")
    storage = KVStorage((LayerStorage(method, method, g, g, offsets[0], rotation),))
    cache = QuantKVCache.from_storage(_config(1, h, d), storage)
    cache.update(k, v, 0)
    read_k, _ = cache.update(k[:, :, :1], v[:, :, :1], 0)  # a decode step reads every slot
    layer = cache.layers[0]
    rows = (k - offsets[0][:, None]).transpose(1, 2).reshape(-1, h, d)
    want_k = reference.nvfp4_quantize_reference(rotation.apply(rows).reshape(-1, d), g)
    stored_k = layer.buffers.k.view(b, layer.capacity, h, -1)[:, :t].reshape(-1, d // 2)
    assert torch.equal(stored_k, want_k[0].reshape(b, t, h, -1).reshape(-1, d // 2))
    want_v = reference.nvfp4_quantize_reference(v.transpose(1, 2).reshape(-1, d), g)
    assert torch.equal(layer.buffers.v.view(b, layer.capacity, h, -1)[:, :t].reshape(-1, d // 2), want_v[0])
    decoded = reference.nvfp4_dequantize_reference(*want_k, g, torch.float32).reshape(b, t, h, d)
    unrotated = rotation.apply(decoded).transpose(1, 2)
    torch.testing.assert_close(read_k[:, :, :t], unrotated, rtol=0, atol=0)
    assert (read_k[:, :, :t] - (k - offsets[0][:, None])).abs().max() < 0.5 * (
        k - offsets[0][:, None]
    ).abs().max()


def test_lossless_rotation_leaves_the_models_scores_unchanged(tiny_qwen2_dir: Path) -> None:
    """fp32 storage with centering + rotation (blocks of 16 and the full head_dim 32): logits of a
    prefill and greedy decode steps equal the unrotated cache's up to fp32 rounding."""
    model, _ = load_model_and_tokenizer(str(tiny_qwen2_dir), device="cpu", dtype="fp32")
    text = model.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, text.vocab_size, (2, 12), generator=gen)
    offsets = torch.randn(text.num_hidden_layers, text.num_key_value_heads, head_dim, generator=gen)
    fp32 = BF16KVMethod(torch.float32)

    def logits(rotation: QKRotation | None) -> torch.Tensor:
        storage = KVStorage(tuple(LayerStorage(fp32, fp32, None, None, offsets[i], rotation)
                                  for i in range(text.num_hidden_layers)))  # fmt: skip
        cache = QuantKVCache.from_storage(model.config, storage)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                 pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                 **{cache_argument(model): cache})  # fmt: skip
        return torch.stack(out.scores)

    plain = logits(None)
    for block in (16, head_dim):
        torch.testing.assert_close(logits(QKRotation(block)), plain, rtol=0, atol=2e-5)


def test_fused_read_rotates_the_query(
    interpreted_attention: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """layer_attention over a rotated layer equals attention of the unrotated query over the
    gather read (K rotated back), for blocks of 16 and the full head."""
    monkeypatch.setattr(fused_attention, "decode_kernels", lambda: interpreted_attention)
    gen = torch.Generator().manual_seed(3)
    b, h, t, d = 2, 2, 9, 32
    k, v = torch.randn(b, h, t, d, generator=gen) * 2, torch.randn(b, h, t, d, generator=gen)
    q = torch.randn(b, 2 * h, 1, d, generator=gen)
    method = get_kv_cache_method("nvfp4_4over6")
    for block in (16, d):
        storage = KVStorage((LayerStorage(method, method, torch.tensor(0.003), torch.tensor(0.002), None,
                                          QKRotation(block)),))  # fmt: skip
        cache = QuantKVCache.from_storage(_config(1, h, d), storage)
        cache.update(k, v, 0)
        read_k, read_v = cache.layers[0]._read(t)
        got = fused_attention.layer_attention(cache.layers[0], q, None, d**-0.5)
        keys, values = read_k.repeat_interleave(2, 1), read_v.repeat_interleave(2, 1)
        want = torch.softmax((q @ keys.transpose(-1, -2)) * d**-0.5, -1) @ values
        torch.testing.assert_close(got[:, 0], want[:, :, 0], rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv", ["nvfp4", "nvfp4_4over6", "blockfp4"])
def test_fused_read_rotates_the_query_cuda(kv: str) -> None:
    """The compiled kernel on the GPU: layer_attention over a rotated, centered layer equals
    attention of the unrotated query over the gather read, for blocks of 16 and the full head."""
    gen = torch.Generator().manual_seed(5)
    b, h, t, d = 3, 2, 37, 64
    k, v = torch.randn(b, h, t, d, generator=gen) * 2, torch.randn(b, h, t, d, generator=gen)
    q = torch.randn(b, 2 * h, 1, d, generator=gen)
    offset = torch.randn(h, d, generator=gen) * 0.5
    k, v, q = (x.cuda().bfloat16() for x in (k + offset[None, :, None], v, q))
    method = get_kv_cache_method(kv)
    for block in (16, d):
        storage = KVStorage((LayerStorage(method, method, torch.tensor(0.004).cuda(),
                                          torch.tensor(0.002).cuda(), offset.cuda(), QKRotation(block)),))  # fmt: skip
        cache = QuantKVCache.from_storage(_config(1, h, d), storage)
        cache.update(k, v, 0)
        read_k, read_v = cache.layers[0]._read(t)
        got = fused_attention.layer_attention(cache.layers[0], q, None, d**-0.5).float()
        keys, values = read_k.float().repeat_interleave(2, 1), read_v.float().repeat_interleave(2, 1)
        want = torch.softmax((q.float() @ keys.transpose(-1, -2)) * d**-0.5, -1) @ values
        torch.testing.assert_close(got[:, 0], want[:, :, 0], rtol=0, atol=3e-2)


def test_calibrate_records_the_amax_of_stored_k(tiny_qwen2_dir: Path) -> None:
    """--center-k with --qk-rotation 16: k_amax is the amax of (K - mean) @ H, k_amax_raw of K @ H,
    per-head amax likewise; k_offset stays the unrotated mean; k_rotation is recorded."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_qwen2_dir), device="cpu", dtype="fp32")
    rotation = QKRotation(16)
    data = calibrate(model, tokenizer, TEXTS, seq_len=40, batch_size=3, per_head=True, center_k=True,
                     rotation=rotation)  # fmt: skip
    assert data["k_rotation"] == {"kind": "hadamard", "block": 16}
    plain = calibrate(model, tokenizer, TEXTS, seq_len=40, batch_size=3, center_k=True)
    for entry, plain_entry, (keys, values, _) in zip(
        data["layers"], plain["layers"], reference_kv(model, tokenizer, TEXTS, seq_len=40)
    ):
        mean = keys.mean(dim=0)
        assert torch.tensor(entry["k_offset"], dtype=torch.float64) == pytest.approx(mean, abs=1e-5)
        stored = rotation.apply(keys - mean).double().abs()
        assert entry["k_amax"] == pytest.approx(stored.max().item(), rel=1e-5)
        assert entry["k_amax_per_head"] == pytest.approx(stored.amax(dim=(0, 2)).tolist(), rel=1e-5)
        assert entry["k_amax_raw"] == pytest.approx(rotation.apply(keys).abs().max().item(), rel=1e-5)
        assert entry["v_amax"] == pytest.approx(values.abs().max().item(), rel=1e-6)
        assert entry["k_amax"] != pytest.approx(plain_entry["k_amax"], rel=1e-3)  # rotation changed it
    assert parse_scales(data).rotation() == rotation


def test_eval_storage_follows_the_scales_files_rotation() -> None:
    """A scales file with k_rotation: every quantized format's layers rotate (after centering),
    the bf16 reference does not; a block that does not tile head_dim is refused."""
    layers = [{"index": i, "k_amax": 4.0, "v_amax": 2.0} for i in range(2)]
    scales = parse_scales({"schema": "fp4kv.scales", "version": 1, "layers": layers,
                           "k_rotation": {"kind": "hadamard", "block": 16}})  # fmt: skip
    offsets = torch.randn(2, 2, 32)
    make_cache = cache_factory(_config(2, 2, 32), ("nvfp4", "nvfp4_4over6", "fp8"), scales, offsets,
                               torch.float32, "cpu")  # fmt: skip
    for kv in ("nvfp4", "nvfp4_4over6", "fp8"):
        layer = make_cache(kv, 8).layers[1]
        assert layer.rotation == QKRotation(16) and torch.equal(layer.k_offset, offsets[1])
    reference_layer = make_cache("bf16", 8).layers[0]
    assert reference_layer.rotation is None and reference_layer.k_offset is None
    with pytest.raises(ScalesFileError, match="k_rotation"):
        parse_scales({"schema": "fp4kv.scales", "version": 1, "layers": layers, "k_rotation": {"block": 12}})
    with pytest.raises(ScalesFileError, match="does not divide the model's head_dim 40"):
        scales.check_model({"num_hidden_layers": 2, "head_dim": 40})


def _config(layers: int, kv_heads: int, head_dim: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4 * head_dim, num_hidden_layers=layers, num_attention_heads=2 * kv_heads,
                       num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=32)  # fmt: skip
