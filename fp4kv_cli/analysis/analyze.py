"""``fp4kv analyze``: where a KV format loses accuracy, and a mixed-format recipe that fixes it.

On teacher-forced GSM8K samples (5-shot prompt + gold answer, as ``eval gsm8k`` fidelity):

1. sensitivity: KL vs bf16 and top-1 agreement with only one layer's K (raw, and centered when
   the scales file has ``k_offset``) or V stored in ``--format``, every other tensor in bf16;
   with ``per_head`` also one run per (layer, KV head) of K (:class:`HeadSubsetMethod`);
2. the K error decomposition per layer and head (:func:`decompose_k`) of the samples' real
   post-RoPE K, read back from a float32 bf16-format cache;
3. :func:`greedy_recipe` from the per-layer KLs, validated with the mixed cache against
   all-``format`` and all-``upgrade`` caches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from fp4kv_cli.analysis.decompose import decompose_k
from fp4kv_cli.analysis.recipe import (
    Recipe,
    bytes_per_element,
    check_budgets,
    check_recipe_path,
    greedy_recipe,
    write_recipe_file,
)
from fp4kv_cli.analysis.round_trip import HeadSubsetMethod
from fp4kv_cli.atomic import atomic_path, write_json_atomic
from fp4kv_cli.cache import QuantKVCache
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.fidelity import Fidelity, measure_fidelity
from fp4kv_cli.evaluate.runner import load_scales_for, teacher_forced_samples
from fp4kv_cli.model_config import KVShape, load_config_dict
from fp4kv_cli.models import (
    DTYPE_NAMES,
    cache_argument,
    input_device,
    load_model_and_tokenizer,
    parse_dtype,
    resolve_device,
)
from fp4kv_cli.progress import count_progress, status
from fp4kv_cli.quant.methods import BF16KVMethod, KVCacheMethod
from fp4kv_cli.quant.registry import get_kv_cache_method
from fp4kv_cli.quant.scales import ScalesFile
from fp4kv_cli.quant.storage import REFERENCE, KVStorage, kv_method

#: Few-shot examples in each teacher-forced sample (lm-eval gsm8k default).
NUM_FEWSHOT = 5
ANALYSIS_JSON = "analysis.json"
HEATMAP_PNG = "sensitivity.png"


@dataclass(frozen=True)
class AnalyzeSettings:
    """What ``fp4kv analyze`` was asked to do (see the CLI options for each field)."""

    model: str
    scales: str
    format: str = "nvfp4"
    upgrade: str = "fp8"
    budget: float = 0.6
    kl_budget: float = 0.001
    samples: int = 8
    per_head: bool = True
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    out: str = "analysis"
    write_recipe: str | None = None


def run_analysis(settings: AnalyzeSettings, console: Console) -> dict[str, Any]:
    """Run the analysis, write ``analysis.json`` and the heat map in ``settings.out`` (and the
    recipe file if asked) and return the JSON-ready result."""
    scales_file, offsets, shape = _check(settings)
    device = resolve_device(settings.device)
    dtype = parse_dtype(settings.dtype, device)
    with status(console, f"loading {settings.model} ({DTYPE_NAMES[dtype]}, {settings.device_map or device})"):
        model, tokenizer = load_model_and_tokenizer(
            settings.model, device, dtype, settings.device_map, settings.max_memory
        )
    device = input_device(model)
    samples = teacher_forced_samples(tokenizer, settings.samples, NUM_FEWSHOT)
    offsets = None if offsets is None else offsets.to(device)
    base = kv_method(settings.format, dtype)
    amax = _Amax.of(scales_file)
    layers, heads = shape.num_layers, shape.num_kv_heads

    rotation = scales_file.rotation()  # every run stores K as the scales file's amax saw it

    def uniform(
        k: Callable[[int], KVCacheMethod],
        v: Callable[[int], KVCacheMethod],
        k_amax: list[float],
        k_offsets: torch.Tensor | None,
    ) -> KVStorage:
        return KVStorage.build(
            [k(i) for i in range(layers)], [v(i) for i in range(layers)], k_amax, amax.v, k_offsets, rotation
        ).to(device)

    bf16 = BF16KVMethod(dtype)

    def only(layer: int, method: KVCacheMethod) -> Callable[[int], KVCacheMethod]:
        return lambda i: method if i == layer else bf16

    def one_layer_offsets(layer: int) -> torch.Tensor | None:
        if offsets is None:
            return None
        picked = torch.zeros_like(offsets)
        picked[layer] = offsets[layer]
        return picked

    runs: dict[str, KVStorage] = {}
    for i in range(layers):
        runs[f"k{i}"] = uniform(only(i, base), lambda _: bf16, amax.k_raw, None)
        if offsets is not None:
            runs[f"k{i}+c"] = uniform(only(i, base), lambda _: bf16, amax.k, one_layer_offsets(i))
        runs[f"v{i}"] = uniform(lambda _: bf16, only(i, base), amax.k_raw, None)
        if settings.per_head:
            k_amax = amax.k if offsets is not None else amax.k_raw
            for h in range(heads):
                method = HeadSubsetMethod(base, [h], dtype)
                runs[f"k{i}h{h}"] = uniform(only(i, method), lambda _: bf16, k_amax, one_layer_offsets(i))

    def make_cache(label: str, capacity_hint: int) -> QuantKVCache:
        if label == REFERENCE:
            return QuantKVCache.for_model(model.config, bf16, None, None, capacity_hint)
        return QuantKVCache.from_storage(model.config, runs[label], capacity_hint)

    with count_progress(console) as progress:
        sensitivity = _measure(model, samples, make_cache, list(runs), progress, "sensitivity runs")
        decomposition = [decompose_k(base, k).to_dict() for k in _post_rope_keys(model, samples)]
        k_sensitivity = [sensitivity[f"k{i}+c" if offsets is not None else f"k{i}"].kl for i in range(layers)]
        recipe = greedy_recipe(
            {"k": k_sensitivity, "v": [sensitivity[f"v{i}"].kl for i in range(layers)]},
            settings.format,
            settings.upgrade,
            settings.budget,
            settings.kl_budget,
            center_k=offsets is not None,
        )
        k_amax = amax.k if offsets is not None else amax.k_raw
        all_base, all_upgrade = f"all-{settings.format}", f"all-{settings.upgrade}"
        upgrade = kv_method(settings.upgrade, dtype)
        runs = {
            "recipe": KVStorage.build(
                [kv_method(name, dtype) for name in recipe.k],
                [kv_method(name, dtype) for name in recipe.v],
                k_amax,
                amax.v,
                offsets,
                rotation,
            ).to(device),
            all_base: uniform(lambda _: base, lambda _: base, k_amax, offsets),
            all_upgrade: uniform(lambda _: upgrade, lambda _: upgrade, k_amax, offsets),
        }
        validation = _measure(model, samples, make_cache, list(runs), progress, "validation runs")
    result = _result(settings, shape, scales_file, sensitivity, decomposition, recipe, validation, runs)
    _write(settings, scales_file, result, recipe)
    return result


@dataclass(frozen=True)
class _Amax:
    """Per-layer calibrated amax: K (of ``K - k_offset`` when centered), raw K, and V."""

    k: list[float]
    k_raw: list[float]
    v: list[float]

    @classmethod
    def of(cls, scales_file: ScalesFile) -> _Amax:
        return cls(scales_file.k_amax(), scales_file.k_amax_raw(), scales_file.v_amax())


def _check(settings: AnalyzeSettings) -> tuple[ScalesFile, torch.Tensor | None, KVShape]:
    if settings.samples <= 0:
        raise FP4KVError(f"--samples must be > 0, got {settings.samples}")
    base, upgrade = get_kv_cache_method(settings.format), get_kv_cache_method(settings.upgrade)
    if base.name == upgrade.name:
        raise FP4KVError(f"--upgrade must differ from --format (both {base.name}); e.g. --upgrade fp8")
    check_budgets(base.name, settings.budget, settings.kl_budget)
    config = load_config_dict(settings.model)
    shape = KVShape.from_config(config)
    for method in (base, upgrade):
        method.check_head_dim(shape.head_dim)
    scales_file, offsets = load_scales_for(config, settings.scales)
    check_recipe_path(settings.write_recipe)
    return scales_file, offsets, shape


def _measure(
    model: Any,
    samples: Sequence[tuple[list[int], list[int]]],
    make_cache: Callable[[str, int], QuantKVCache],
    labels: list[str],
    progress: Progress,
    description: str,
) -> dict[str, Fidelity]:
    """:func:`measure_fidelity` of ``labels`` with one progress step per teacher-forced run."""
    task = progress.add_task(description, total=len(samples) * (len(labels) + 1))

    def counted(label: str, capacity_hint: int) -> QuantKVCache:
        progress.advance(task)
        return make_cache(label, capacity_hint)

    return measure_fidelity(model, samples, counted, labels, REFERENCE)


def _post_rope_keys(model: Any, samples: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Per layer, the post-RoPE K ``[tokens, heads, head_dim]`` float32 (CPU) of every sample,
    read from an unquantized float32 cache after one forward of prompt + answer."""
    argument = cache_argument(model)
    device = input_device(model)
    per_layer: list[list[torch.Tensor]] = []
    for prompt_ids, answer_ids in samples:
        ids = torch.tensor([list(prompt_ids) + list(answer_ids)], dtype=torch.long, device=device)
        cache = QuantKVCache.for_model(model.config, BF16KVMethod(torch.float32), capacity_hint=ids.shape[1])
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{argument: cache})
        for i, layer in enumerate(cache.layers):
            if len(per_layer) <= i:
                per_layer.append([])
            per_layer[i].append(layer.buffers.k[: ids.shape[1]].float().cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def _cell_bytes(storage: KVStorage, shape: KVShape) -> int:
    """Bytes one token occupies over every layer's K and V in ``storage``'s formats."""
    return sum(
        layer.k_method.compute_cell_size(shape.num_kv_heads, shape.head_dim, 1, 1)
        + layer.v_method.compute_cell_size(shape.num_kv_heads, shape.head_dim, 1, 1)
        for layer in storage.layers
    )


def _result(
    settings: AnalyzeSettings,
    shape: KVShape,
    scales_file: ScalesFile,
    sensitivity: dict[str, Fidelity],
    decomposition: list[dict[str, Any]],
    recipe: Recipe,
    validation: dict[str, Fidelity],
    runs: dict[str, KVStorage],
) -> dict[str, Any]:
    def fid(f: Fidelity | None) -> dict[str, float] | None:
        return None if f is None else {"kl": f.kl, "top1": f.top1}

    layers = []
    for i in range(shape.num_layers):
        heads = None
        if settings.per_head:
            heads = [fid(sensitivity[f"k{i}h{h}"]) for h in range(shape.num_kv_heads)]
        layers.append({
            "index": i,
            "k": fid(sensitivity[f"k{i}"]),
            "k_centered": fid(sensitivity.get(f"k{i}+c")),
            "v": fid(sensitivity[f"v{i}"]),
            "k_heads": heads,
            "k_decomposition": decomposition[i],
            "recipe": {"k": recipe.k[i], "v": recipe.v[i]},
        })  # fmt: skip
    bf16_cell = BF16KVMethod(torch.bfloat16).compute_cell_size(
        shape.num_kv_heads, shape.head_dim, shape.num_layers
    )
    names = {"recipe": recipe.bytes_per_element, f"all-{settings.format}": bytes_per_element(settings.format),
             f"all-{settings.upgrade}": bytes_per_element(settings.upgrade)}  # fmt: skip
    first = next(iter(sensitivity.values()))
    return {
        "settings": asdict(settings),
        "kv_shape": asdict(shape),
        "k_centering_available": any(layer.k_offset is not None for layer in scales_file.layers),
        "qk_rotation": None if scales_file.rotation() is None else scales_file.rotation().block,
        "samples": first.samples,
        "tokens": first.tokens,
        "layers": layers,
        "recipe": recipe.to_dict(),
        "validation": {
            label: {
                **fid(validation[label]),
                "bytes_per_element": names[label],
                "kv_bytes_per_token": _cell_bytes(runs[label], shape),
                "kv_bytes_per_token_vs_bf16": _cell_bytes(runs[label], shape) / bf16_cell,
            }
            for label in runs
        },
    }


def _write(
    settings: AnalyzeSettings, scales_file: ScalesFile, result: dict[str, Any], recipe: Recipe
) -> None:
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / ANALYSIS_JSON, result)
    plot_sensitivity(out / HEATMAP_PNG, result)
    if settings.write_recipe is not None:
        write_recipe_file(settings.write_recipe, scales_file, recipe)


def plot_sensitivity(path: Path, result: dict[str, Any]) -> Path:
    """Heat maps of log10 KL: per layer for K / centered K / V, and per (layer, KV head) of K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    columns = [("K", "k"), ("K centered", "k_centered"), ("V", "v")]
    columns = [(title, key) for title, key in columns if layers[0][key] is not None]
    per_layer = [[_log_kl(layer[key]["kl"]) for _, key in columns] for layer in layers]
    per_head = (
        [[_log_kl(h["kl"]) for h in layer["k_heads"]] for layer in layers] if layers[0]["k_heads"] else None
    )
    panels = [("per layer", per_layer, [title for title, _ in columns])]
    if per_head is not None:
        panels.append(("K per KV head", per_head, [str(h) for h in range(len(per_head[0]))]))
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 1, 0.25 * len(layers) + 2.5),
                                squeeze=False)  # fmt: skip
    for axis, (title, values, labels) in zip(axes[0], panels):
        image = axis.imshow(values, aspect="auto", cmap="magma")
        axis.set_title(f"{title}: log10 KL vs bf16")
        axis.set_xticks(range(len(labels)), labels)
        axis.set_ylabel("layer")
        figure.colorbar(image, ax=axis)
    settings = result["settings"]
    figure.suptitle(f"{settings['format']} sensitivity, {Path(settings['model']).name}")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return path


def _log_kl(kl: float) -> float:
    return math.log10(max(kl, 1e-8))
