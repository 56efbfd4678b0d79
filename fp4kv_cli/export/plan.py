"""Per-layer values an export writes, and what each consumer will make of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp4kv_cli.export.conventions import Consumer
from fp4kv_cli.export.source import KVSource
from fp4kv_cli.quant.scales import amax_to_scale

#: Relative slack when comparing an implied amax with the calibrated one: one bfloat16 step
#: (scales are rounded up to bfloat16 values, see :func:`stored`).
MATCH_RTOL = 2.0**-7


def stored(value: float) -> float:
    """``value`` rounded up to the nearest bfloat16 value (stored as float32 in the checkpoint).

    vLLM's and SGLang's ModelOpt KV path (``BaseKVCacheMethod.create_weights``) create the
    k/v scale parameters in the model dtype, so a float32 scale would be rounded to nearest
    bf16 / fp16 there, up to 0.4% below ``amax / 448`` (values clip). A bfloat16 value is
    exact in fp16 and fp32 too, so every engine gets the exported scale, never a smaller one.
    """
    bits = torch.tensor([value], dtype=torch.float32).view(torch.int32)
    return float(((bits + 0xFFFF) & -0x10000).view(torch.float32))


@dataclass(frozen=True)
class LayerPlan:
    """What one layer exports.

    ``k_amax`` / ``v_amax`` are the amax the scales must cover: for a centered K the amax of
    raw K (so engines that ignore the offset do not clip), or, in an export that makes engines
    center K (``centered``), the amax of ``K - k_offset``. ``k_amax_centered`` / ``k_amax_raw``
    are the amax of ``K - k_offset`` and of K when the scales file has an offset. Scales are
    rounded up to bfloat16 values.
    """

    index: int
    k_amax: float
    v_amax: float
    k_scale: float
    v_scale: float
    k_scale_per_head: tuple[float, ...] | None
    v_scale_per_head: tuple[float, ...] | None
    k_amax_centered: float | None
    k_offset: tuple[tuple[float, ...], ...] | None
    k_amax_raw: float | None = None
    centered: bool = False


def plan_layers(
    source: KVSource, convention: str, per_head: bool, centered: bool = False
) -> tuple[LayerPlan, ...]:
    """Scales of every layer of ``source`` in ``convention``; per-head ones only if asked and known.
    ``centered``: K scales cover ``K - k_offset`` (for an engine that stores centered K)."""
    plans = []
    for layer, raw in zip(source.layers, source.k_amax_raw):
        k_amax = raw if raw is not None and not centered else layer.k_amax
        k_heads = layer.k_amax_per_head
        if k_heads is not None and layer.k_offset is not None and not centered:
            k_heads = tuple(a + max(abs(v) for v in row) for a, row in zip(k_heads, layer.k_offset))
        plans.append(
            LayerPlan(
                index=layer.index,
                k_amax=k_amax,
                v_amax=layer.v_amax,
                k_scale=stored(amax_to_scale(k_amax, convention)),  # type: ignore[arg-type]
                v_scale=stored(amax_to_scale(layer.v_amax, convention)),  # type: ignore[arg-type]
                k_scale_per_head=_heads(k_heads, convention) if per_head else None,
                v_scale_per_head=_heads(layer.v_amax_per_head, convention) if per_head else None,
                k_amax_centered=layer.k_amax if raw is not None else None,
                k_offset=layer.k_offset,
                k_amax_raw=raw,
                centered=centered and raw is not None,
            )
        )
    return tuple(plans)


def _heads(amax: tuple[float, ...] | None, convention: str) -> tuple[float, ...] | None:
    return None if amax is None else tuple(stored(amax_to_scale(a, convention)) for a in amax)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ConsumerView:
    """One consumer reading one exported checkpoint: does it read the scales, and how."""

    consumer: Consumer
    reads: bool
    note: str
    shared_kv: bool = False

    def used(self, plan: LayerPlan) -> tuple[float, float]:
        """(K, V) values the engine hands to its kernel; 1.0 (the engines' fallback) if unread."""
        if not self.reads:
            return self.consumer.used(1.0), self.consumer.used(1.0)
        if self.shared_kv:
            both = max(plan.k_scale, plan.v_scale)
            return self.consumer.used(both), self.consumer.used(both)
        return self.consumer.used(plan.k_scale), self.consumer.used(plan.v_scale)

    def implied(self, plan: LayerPlan) -> tuple[float, float]:
        """(K, V) amax the kernel assumes."""
        k, v = self.used(plan)
        return k * self.consumer.kernel_divisor, v * self.consumer.kernel_divisor


def verdict(implied: float, needed: float) -> str:
    """``"ok"``, ``"OVERFLOW xR"`` (implied amax too small: values saturate) or ``"wastes xR"``."""
    ratio = implied / needed
    if abs(ratio - 1.0) <= MATCH_RTOL:
        return "ok"
    if ratio < 1.0:
        return f"OVERFLOW x{1 / ratio:.3g}"
    return f"wastes x{ratio:.3g}"


#: Architectures whose SGLang loader never maps k/v scale names onto the attention layer: the
#: default (legacy) ``Qwen2ForCausalLM.load_weights`` of sgl-project/sglang 0.5.23
#: (``python/sglang/srt/models/qwen2.py``) calls no ``maybe_remap_kv_scale_name``, so
#: ``self_attn.k_scale`` / ``k_proj.k_scale`` find no parameter and are dropped.
SGLANG_DROPS_KV_SCALES = ("qwen2",)


def consumer_view(
    consumer: Consumer, fmt: str, qkv_quantized: bool, per_head: bool = False, model_type: str = ""
) -> ConsumerView:
    """Whether ``consumer`` reads scales exported in ``fmt`` (see docs/export.md for sources).

    A JSON sidecar is read by SGLang only for FP8 (``--quantization-param-path``); for the other
    consumers it is evaluated as if its values were handed to the engine.
    """
    engine = consumer.engine
    if engine == "sglang" and fmt != "json" and model_type in SGLANG_DROPS_KV_SCALES:
        return ConsumerView(
            consumer,
            False,
            f"SGLang's {model_type} loader does not remap k/v scale names: the scales are dropped, 1.0",
        )
    if fmt == "modelopt":
        if engine == "trtllm" and not qkv_quantized:
            return ConsumerView(
                consumer,
                False,
                "TRT-LLM reads k_scale/v_scale in FP8QDQLinearMethod of the fused QKV only; "
                "with BF16 QKV weights kv_scales stay 1.0",
            )
        return ConsumerView(consumer, True, "reads k_proj.k_scale / v_proj.v_scale via the ModelOpt config")
    if fmt == "fp8":
        if engine in ("vllm", "sglang"):
            return ConsumerView(
                consumer,
                True,
                "Fp8Config (quant_method fp8) attaches Fp8KVCacheMethod: loads self_attn.k_scale/v_scale",
            )
        return ConsumerView(
            consumer,
            False,
            f"{engine} reads KV scales of ModelOpt checkpoints (kv_cache_quant_algo); quant_method fp8 declares none",
        )
    if fmt == "compressed-tensors":
        if engine == "vllm":
            return ConsumerView(
                consumer, True, "CompressedTensorsKVCacheMethod loads self_attn.k_scale/v_scale"
            )
        if engine == "sglang" and not per_head:
            return ConsumerView(
                consumer,
                True,
                "CompressedTensorsKVCacheMethod (static per-tensor FP8) loads self_attn.k_scale/v_scale",
            )
        if engine == "sglang":
            return ConsumerView(
                consumer,
                False,
                "SGLang ignores an attn_head kv_cache_scheme (static per-tensor FP8 only); scales stay 1.0",
            )
        return ConsumerView(
            consumer,
            False,
            f"{engine}'s compressed-tensors path attaches no KV scale loader; scales stay 1.0",
        )
    if engine == "sglang" and consumer.kv_dtype == "fp8":
        return ConsumerView(
            consumer,
            True,
            "via --quantization-param-path: one scaling factor per layer = max(k, v)",
            shared_kv=True,
        )
    return ConsumerView(
        consumer, True, "the engine does not read this file: values shown as if given to it as k/v scales"
    )
