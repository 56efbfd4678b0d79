"""Calibrate a decoder's KV cache: run texts through it, capture every cache write, and build
the ``scales.json`` dict (schema ``fp4kv.scales`` v1, see :mod:`fp4kv_cli.quant.scales`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch

from fp4kv_cli import __version__
from fp4kv_cli.calibration.capture import (
    RecordingCache,
    forward_kwargs,
    make_batches,
    nonfinite_rows,
    tokenize,
)
from fp4kv_cli.calibration.stats import KVStatistics, LayerSummary, RealTokens
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.models import DTYPE_NAMES, input_device
from fp4kv_cli.quant.rotation import QKRotation
from fp4kv_cli.quant.scales import SCALES_SCHEMA, SCALES_VERSION, config_hash

#: Entries of ``k_top_channels`` per layer.
TOP_CHANNELS = 8


def calibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    seq_len: int,
    batch_size: int,
    per_head: bool = False,
    center_k: bool = False,
    rotation: QKRotation | None = None,
    *,
    model_id: str | None = None,
    dataset: str = "custom",
    split: str | None = None,
    text_field: str | None = None,
    sample_size: int = 1 << 20,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """KV amax of ``model`` over ``texts``: the ``scales.json`` dict.

    Each text is tokenized and truncated to ``seq_len`` tokens; batches of ``batch_size`` are
    left-padded and run through one plain forward each, with a cache whose ``update`` records
    K (after RoPE) and V exactly as the model writes them. Pad positions are excluded.

    Parameters
    ----------
    model, tokenizer
        A causal LM (e.g. from :func:`fp4kv_cli.models.load_model_and_tokenizer`) and its tokenizer
        (must have a pad token).
    texts
        Calibration texts (non-empty).
    seq_len, batch_size
        Tokens kept per text; texts per forward.
    per_head
        Also write ``k_amax_per_head`` / ``v_amax_per_head`` (``[num_kv_heads]`` each).
    center_k
        Write ``k_offset`` (per-channel mean of post-RoPE K, ``[num_kv_heads][head_dim]``), make
        ``k_amax`` the amax of ``K - k_offset`` and keep the uncentered one as ``k_amax_raw``.
    rotation
        Record every K statistic of what a rotating cache stores, ``(K - k_offset) @ H``
        (:mod:`fp4kv_cli.quant.rotation`; ``k_amax_raw``, the per-head amax, percentiles and top
        channels of ``K @ H``), and the rotation as the top-level ``k_rotation``; ``k_offset``
        stays the mean of unrotated K, which the cache subtracts before rotating.
    model_id, dataset, split, text_field
        Recorded in the ``model`` / ``calibration`` sections.
    sample_size, seed
        Per-layer percentile subsample size and its seed (see :class:`KVStatistics`).
    on_batch
        Called after each batch with its real tokens and the run's total (progress display).

    Raises
    ------
    FP4KVError
        Bad sizes, no tokens, NaN/Inf in a cache write (naming layer and dataset row), or a model
        that wrote no (or not every layer of its) KV cache.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise FP4KVError(
            f"seq-len and batch-size must be > 0 (got {seq_len}, {batch_size}); pass positive values"
        )
    if not texts:
        raise FP4KVError("no calibration texts; pass a dataset with non-empty texts")
    if tokenizer.pad_token_id is None:
        raise FP4KVError(
            "tokenizer has no pad token; load the model with fp4kv_cli.models.load_model_and_tokenizer"
        )
    sequences = tokenize(tokenizer, texts, seq_len)
    total_tokens = sum(len(ids) for ids in sequences)
    if total_tokens == 0:
        raise FP4KVError("the calibration texts tokenize to no tokens; pass other data")
    device = input_device(model)
    stats = KVStatistics(total_tokens=total_tokens, sample_size=sample_size, seed=seed)
    if rotation is not None:
        head_dim = model.config.get_text_config(decoder=True)
        head_dim = getattr(head_dim, "head_dim", None) or head_dim.hidden_size // head_dim.num_attention_heads
        rotation.check_head_dim(head_dim)
    recorder = stats.record if rotation is None else _rotating(stats.record, rotation)
    cache = None
    for batch in make_batches(sequences, batch_size, tokenizer.pad_token_id):
        stats.start_batch(RealTokens.from_mask(batch.attention_mask, device))
        cache = RecordingCache(model.config, recorder)
        with torch.inference_mode():
            model(**forward_kwargs(model, batch, device, cache))
        if not stats.finish_batch():
            _raise_nonfinite(model, batch, device)
        if on_batch is not None:
            on_batch(batch.num_tokens, total_tokens)
    text_config = model.config.get_text_config(decoder=True)
    num_layers = int(text_config.num_hidden_layers)
    _check_recorded(stats, num_layers)
    layer_types = getattr(text_config, "layer_types", None) or [
        "sliding_attention" if getattr(layer, "is_sliding", False) else "full_attention"
        for layer in cache.layers
    ]
    summaries = [stats.layer_summary(index, TOP_CHANNELS) for index in range(num_layers)]
    if rotation is not None:  # the mean of K @ H is mean(K) @ H: back to the basis the cache centers in
        for summary in summaries:
            mean = torch.tensor(summary.k_offset, dtype=torch.float64)
            summary.k_offset = rotation.apply(mean).tolist()
    scales = {
        "schema": SCALES_SCHEMA,
        "version": SCALES_VERSION,
        "model": {
            "id": model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "config_hash": config_hash(model.config.to_dict()),
            "model_type": text_config.model_type,
            "num_layers": num_layers,
            "num_kv_heads": stats.layer_shape(0)[0],
            "head_dim": stats.layer_shape(0)[1],
        },
        "calibration": {
            "dataset": dataset,
            "split": split,
            "text_field": text_field,
            "num_samples": sum(1 for ids in sequences if ids),
            "num_tokens": total_tokens,
            "seq_len": seq_len,
            "dtype": DTYPE_NAMES.get(model.dtype, str(model.dtype)),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fp4kv_version": __version__,
            "center_k": center_k,
            "percentile_method": _percentile_method(stats, seed),
        },
        "layers": [
            _layer_entry(index, str(layer_types[index]), summary, per_head, center_k)
            for index, summary in enumerate(summaries)
        ],
    }
    if rotation is not None:
        scales["k_rotation"] = rotation.to_dict()
    return scales


def _rotating(record: Callable[[int, torch.Tensor, torch.Tensor], None], rotation: QKRotation) -> Callable:
    """``record`` fed ``K @ H`` (fp32) instead of K, and V as fp32 (exact) to match its dtype."""

    def rotated(layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        record(layer_idx, rotation.apply(key_states), value_states.float())

    return rotated


def _layer_entry(
    index: int, layer_type: str, s: LayerSummary, per_head: bool, center_k: bool
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "index": index,
        "layer_type": layer_type,
        "k_amax": s.k_amax_centered if center_k else s.k_amax_raw,
        "v_amax": s.v_amax,
        "k_amax_per_head": (s.k_amax_centered_per_head if center_k else s.k_amax_raw_per_head)
        if per_head
        else None,
        "v_amax_per_head": s.v_amax_per_head if per_head else None,
        "k_percentiles": s.k_percentiles,
        "v_percentiles": s.v_percentiles,
        "k_top_channels": s.k_top_channels,
    }
    if center_k:
        entry["k_offset"] = s.k_offset
        entry["k_amax_raw"] = s.k_amax_raw
    return entry


def _raise_nonfinite(model: torch.nn.Module, batch: Any, device: torch.device) -> None:
    found = nonfinite_rows(model, batch, device)
    where = (
        ""
        if found is None
        else f" first in layer {found[0]}, dataset row(s) {', '.join(map(str, found[1][:5]))}"
    )
    raise FP4KVError(
        f"NaN/Inf in the captured K/V{where}; check the weights, try --dtype fp32, or drop those samples"
    )


def _percentile_method(stats: KVStatistics, seed: int) -> str:
    heads, head_dim = stats.layer_shape(0)
    if stats.exact(heads * head_dim):
        return "exact"
    tokens = stats.sample_tokens(heads * head_dim)
    return (
        f"all K/V elements of {tokens} real tokens per layer drawn uniformly with replacement (seed {seed})"
    )


def _check_recorded(stats: KVStatistics, num_layers: int) -> None:
    if not stats.recorded_layers:
        raise FP4KVError(
            "the model wrote nothing to a KV cache; pass a decoder LLM (Llama, Qwen2, Mistral, ...)"
        )
    missing = sorted(set(range(num_layers)) - stats.recorded_layers)
    if missing:
        raise FP4KVError(
            f"layers {missing[:8]} never wrote to the KV cache (linear attention or shared KV?); "
            "fp4kv calibrates models whose every layer caches K/V"
        )
