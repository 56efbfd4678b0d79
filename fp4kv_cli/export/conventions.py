"""What each serving engine does with a loaded KV scale, and which convention it therefore needs.

A *consumer* is one engine on one GPU family for one KV dtype. It multiplies the per-layer
scale ``s`` read from the checkpoint by ``factor`` and hands ``s * factor`` to a kernel that
reads it as ``amax / kernel_divisor``. So the amax the consumer effectively assumes is
``s * factor * kernel_divisor``, and the checkpoint must hold ``amax / (kernel_divisor * factor)``.

Every entry below cites the source file its numbers were read from (see ``docs/export.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.formats import E2M1_MAX, E4M3_MAX
from fp4kv_cli.quant.scales import CONVENTION_DIVISORS, Convention

KV_DTYPES = ("fp8", "nvfp4")
ENGINES = ("sglang", "vllm", "trtllm")
TARGETS = ("sm90", "sm100", "sm120")
FORMATS = ("modelopt", "compressed-tensors", "fp8", "json")

#: Engine used when ``--target`` is given without ``--engine``.
DEFAULT_ENGINE = "sglang"

_SGLANG_NVFP4 = "sgl-project/sglang python/sglang/srt/layers/quantization/fp4_kv_cache_quant_method.py"
_SGLANG_KV = "sgl-project/sglang python/sglang/srt/layers/quantization/kv_cache.py"
_VLLM_KV = "vllm-project/vllm vllm/model_executor/layers/quantization/kv_cache.py"
_TRTLLM_LINEAR = "NVIDIA/TensorRT-LLM tensorrt_llm/_torch/modules/linear.py"


@dataclass(frozen=True)
class Consumer:
    """One engine + GPU family + KV dtype, and what it does to a loaded per-layer scale."""

    engine: str
    target: str
    kv_dtype: str
    factor: float
    kernel_divisor: float
    how: str
    source: str

    @property
    def name(self) -> str:
        """Short label, e.g. ``"sglang sm100"``."""
        return f"{self.engine} {self.target}"

    @property
    def expects(self) -> Convention:
        """The checkpoint convention this consumer applies correctly."""
        divisor = self.kernel_divisor * self.factor
        for convention, value in CONVENTION_DIVISORS.items():
            if abs(value - divisor) <= 1e-9 * value:
                return convention  # type: ignore[return-value]
        raise AssertionError(f"{self.name}: no convention divides by {divisor}")

    def used(self, scale: float) -> float:
        """The value the engine hands to its kernel for a stored ``scale``."""
        return scale * self.factor

    def implied_amax(self, scale: float) -> float:
        """The amax the kernel assumes for a stored ``scale``."""
        return scale * self.factor * self.kernel_divisor


def _fp8(engine: str, target: str, source: str) -> Consumer:
    return Consumer(engine, target, "fp8", 1.0, E4M3_MAX, "uses the scale as is (FP8 KV: amax / 448)", source)


#: Every consumer whose behaviour was read in the engine's source.
CONSUMERS: tuple[Consumer, ...] = (
    Consumer(
        "sglang",
        "sm100",
        "nvfp4",
        E2M1_MAX,
        E4M3_MAX,
        "multiplies by 6 for the TRT-LLM XQA/GenMHA kernels, which read amax / 448",
        _SGLANG_NVFP4,
    ),
    Consumer(
        "sglang",
        "sm120",
        "nvfp4",
        1.0,
        E2M1_MAX * E4M3_MAX,
        "uses the scale as is as the NVFP4 global scale (amax / 2688)",
        _SGLANG_NVFP4,
    ),
    Consumer(
        "trtllm",
        "sm100",
        "nvfp4",
        1.0,
        E4M3_MAX,
        "kv_scales = [1, max(k_scale), max(v_scale)], read as amax / 448 (no x6 since ModelOpt 0.42)",
        _TRTLLM_LINEAR,
    ),
    *(_fp8("sglang", target, _SGLANG_KV) for target in TARGETS),
    *(_fp8("vllm", target, _VLLM_KV) for target in TARGETS),
    *(_fp8("trtllm", target, _TRTLLM_LINEAR) for target in TARGETS),
)


@dataclass(frozen=True)
class Resolution:
    """The convention an export writes, why, and the consumers its table evaluates."""

    convention: Convention
    consumers: tuple[Consumer, ...]
    reason: str
    warnings: tuple[str, ...] = ()


def consumers_for(
    kv_dtype: str, engine: str | None = None, target: str | None = None
) -> tuple[Consumer, ...]:
    """All verified consumers matching the filters."""
    return tuple(
        c
        for c in CONSUMERS
        if c.kv_dtype == kv_dtype and engine in (None, c.engine) and target in (None, c.target)
    )


def check_choice(value: str | None, choices: tuple[str, ...], option: str) -> None:
    """Raise :class:`FP4KVError` unless ``value`` is ``None`` or one of ``choices``."""
    if value is not None and value not in choices:
        raise FP4KVError(f"unknown {option} {value!r}; use one of {', '.join(choices)}")


def resolve(
    kv_dtype: str,
    convention: str | None,
    engine: str | None,
    target: str | None,
    force_convention: bool = False,
) -> Resolution:
    """Pick the convention to write from ``--convention`` / ``--engine`` / ``--target``.

    Rules (documented in ``docs/export.md``): FP8 is always ``"448"``. With a target (engine
    defaulting to SGLang) the consumer decides; an explicit convention that contradicts it is
    an error unless ``force_convention``. With an engine alone, its targets must agree. With
    neither, NVFP4 needs an explicit convention because engines disagree.
    """
    check_choice(kv_dtype, KV_DTYPES, "--kv-dtype")
    check_choice(convention, tuple(CONVENTION_DIVISORS), "--convention")
    check_choice(engine, ENGINES, "--engine")
    check_choice(target, TARGETS, "--target")
    if kv_dtype == "fp8" and convention == "6x448":
        raise FP4KVError(
            "FP8 KV scales are amax / 448 in every engine; amax / 2688 would overflow FP8 6x; drop --convention"
        )
    if kv_dtype == "nvfp4" and target == "sm90":
        raise FP4KVError("NVFP4 KV cache needs Blackwell (sm100/sm120); for sm90 export --kv-dtype fp8")
    if target is not None:
        return _resolve_target(kv_dtype, convention, engine or DEFAULT_ENGINE, target, force_convention)
    if engine is not None:
        return _resolve_engine(kv_dtype, convention, engine, force_convention)
    if convention is not None:
        return Resolution(convention, consumers_for(kv_dtype), f"--convention {convention} as given")  # type: ignore[arg-type]
    if kv_dtype == "fp8":
        return Resolution("448", consumers_for("fp8"), "FP8 KV scales are amax / 448 in every engine")
    raise FP4KVError(
        "NVFP4 scales need --target sm100|sm120 (and --engine) or --convention 448|6x448: "
        "SGLang reads amax / 2688, TensorRT-LLM amax / 448"
    )


def _resolve_target(
    kv_dtype: str, convention: str | None, engine: str, target: str, force: bool
) -> Resolution:
    found = consumers_for(kv_dtype, engine, target)
    if not found:
        raise FP4KVError(
            f"{engine} on {target} with {kv_dtype} KV is not a verified combination "
            f"(verified: {', '.join(c.name for c in consumers_for(kv_dtype))}); pick another --engine/--target"
        )
    consumer = found[0]
    reason = f"{consumer.name} {consumer.how} ({consumer.source}), so it needs convention {consumer.expects}"
    return _apply_explicit(consumer.expects, convention, (consumer,), reason, force)


def _resolve_engine(kv_dtype: str, convention: str | None, engine: str, force: bool) -> Resolution:
    found = consumers_for(kv_dtype, engine)
    if not found:
        raise FP4KVError(
            f"{engine} with {kv_dtype} KV is not verified by fp4kv "
            f"(verified: {', '.join(sorted({c.engine for c in consumers_for(kv_dtype)}))}); pick another --engine"
        )
    expected = {c.expects for c in found}
    if len(expected) > 1:
        raise FP4KVError(f"{engine} needs different conventions per GPU for {kv_dtype}; add --target")
    (wanted,) = expected
    reason = f"{engine} ({', '.join(c.target for c in found)}) needs convention {wanted}: {found[0].how}"
    return _apply_explicit(wanted, convention, found, reason, force)


def _apply_explicit(
    wanted: Convention, convention: str | None, consumers: tuple[Consumer, ...], reason: str, force: bool
) -> Resolution:
    if convention is None or convention == wanted:
        return Resolution(wanted, consumers, reason)
    if not force:
        raise FP4KVError(
            f"--convention {convention} contradicts the target: {reason}; drop --convention, "
            "or add --force-convention to write it anyway (e.g. for an older engine build)"
        )
    warning = f"--force-convention: writing {convention} although {reason}; the table shows the damage"
    return Resolution(convention, consumers, reason, (warning,))  # type: ignore[arg-type]
