"""``fp4kv bench kernels``: NVFP4 / BlockFP4 quantize and dequantize throughput per backend.

On the same tensors (``tokens x heads x head_dim`` bf16, the KV layout) every backend runs four
ops per format: ``quantize`` ``[M, K] -> packed + scales``, ``dequantize`` back to bf16, the fused
``store`` (quantize into cache slots ``loc``) and ``gather`` (dequantize slots ``loc``); ``loc`` is
a random permutation of half the slots, so reads and writes are scattered. Times are medians
of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run). Effective bandwidth
counts the bytes an op must read plus write; it is also given as a share of the device-to-device
copy bandwidth measured in the same run. Each backend's output bytes are compared with the
PyTorch reference's.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fp4kv_cli.atomic import atomic_path, write_json_atomic
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.quant.backend import NVFP4_WRITERS, BackendUnavailableError, TorchBackend
from fp4kv_cli.quant.formats import E2M1_MAX, E4M3_MAX, FP4_BLOCK_SIZE

FORMATS = ("nvfp4", "nvfp4_4over6", "blockfp4")
OPS = ("quantize", "dequantize", "store", "gather")
#: Formats timed only where they write: their bytes are read by another format's readers.
WRITE_ONLY = {"nvfp4_4over6": ("quantize", "store")}
#: Bytes of the copy used as the bandwidth yardstick (read once, written once).
COPY_BYTES = 1 << 30
JSON_NAME = "bench_kernels.json"
PNG_NAME = "bench_kernels.png"


@dataclass(frozen=True)
class KernelTiming:
    """One (format, op, backend, size) measurement. ``bit_exact`` is None for the reference itself."""

    fmt: str
    op: str
    backend: str
    elements: int
    tokens: int
    ms: float
    gbps: float
    pct_of_copy: float
    bit_exact: bool | None


@dataclass(frozen=True)
class BenchSetup:
    """What a run measures: sizes (elements, multiples of ``heads * head_dim``) and the backends."""

    sizes: tuple[int, ...]
    heads: int
    head_dim: int
    backends: dict[str, TorchBackend]
    device: torch.device

    def cases(self) -> list[tuple[int, str, str, str]]:
        """``(elements, fmt, op, backend)`` in run order, the reference first for each op."""
        order = ["torch"] + [name for name in self.backends if name != "torch"]
        return [
            (size, fmt, op, name)
            for size in self.sizes
            for fmt in FORMATS
            for op in OPS
            for name in order
            if runs_natively(name, fmt, op, self.device) and op in WRITE_ONLY.get(fmt, OPS)
        ]


def runs_natively(backend: str, fmt: str, op: str, device: torch.device) -> bool:
    """Whether ``backend`` runs ``op`` with its own kernel (FlashInfer: NVFP4 decode on SM80+,
    encode on SM100+; a fallback to Triton is not measured twice)."""
    if backend != "flashinfer":
        return True
    if fmt != "nvfp4":
        return False
    if op in ("dequantize", "gather"):
        return True
    return torch.cuda.get_device_capability(device) >= (10, 0)


def default_sizes(min_elements: int, max_elements: int, row: int) -> tuple[int, ...]:
    """Powers of 4 from ``min_elements`` up to ``max_elements`` (always included), multiples of ``row``."""
    if min_elements < row or max_elements < min_elements:
        raise FP4KVError(
            f"sizes must satisfy {row} <= --min-elements <= --max-elements, "
            f"got {min_elements} and {max_elements}"
        )
    sizes = []
    size = min_elements
    while size < max_elements:
        sizes.append(size // row * row)
        size *= 4
    sizes.append(max_elements // row * row)
    return tuple(dict.fromkeys(sizes))


def make_setup(min_elements: int, max_elements: int, heads: int, head_dim: int) -> BenchSetup:
    """Check the machine and build the backends; :class:`FP4KVError` without a usable GPU."""
    if not torch.cuda.is_available():
        raise FP4KVError(
            "fp4kv bench kernels needs a CUDA GPU (SM80+) and none is visible; run it on a GPU machine"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise FP4KVError(
            f"fp4kv bench kernels needs compute capability 8.0+, {torch.cuda.get_device_name(device)} has "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}; use an Ampere or newer GPU"
        )
    if head_dim % FP4_BLOCK_SIZE:
        raise FP4KVError(f"--head-dim must be a multiple of {FP4_BLOCK_SIZE}, got {head_dim}")
    try:
        from fp4kv_cli.quant.kernels import FlashInferBackend, TritonBackend
    except ImportError as err:
        raise FP4KVError(f"the Triton kernels cannot be imported ({err}); pip install triton") from None
    backends: dict[str, TorchBackend] = {"torch": TorchBackend(), "triton": TritonBackend()}
    try:
        backends["flashinfer"] = FlashInferBackend()
    except BackendUnavailableError:
        pass
    sizes = default_sizes(min_elements, max_elements, heads * head_dim)
    return BenchSetup(sizes=sizes, heads=heads, head_dim=head_dim, backends=backends, device=device)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Host, GPU and library versions, as printed and saved with the results."""
    props = torch.cuda.get_device_properties(device)
    return {
        "host": platform.node(),
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "flashinfer": _version("flashinfer-python"),
        "python": platform.python_version(),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _time_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), the yardstick for % of copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def _moved_bytes(op: str, elements: int, tokens: int, in_bytes: int) -> int:
    """Bytes an op must read plus write: elements, packed nibbles, scale bytes, slot indices."""
    fp4 = elements // 2 + elements // FP4_BLOCK_SIZE
    slots = tokens * 8 if op in ("store", "gather") else 0
    return elements * in_bytes + fp4 + slots


class _Tensors:
    """The inputs one size shares across backends: x, g, the reference bytes, slots and buffers."""

    def __init__(self, setup: BenchSetup, elements: int, seed: int = 0) -> None:
        gen = torch.Generator(device=setup.device).manual_seed(seed)
        self.tokens = elements // (setup.heads * setup.head_dim)
        shape = (self.tokens, setup.heads, setup.head_dim)
        self.x = (torch.randn(shape, generator=gen, device=setup.device) * 2).to(torch.bfloat16)
        self.x2d = self.x.view(-1, setup.head_dim)
        self.g = self.x.abs().amax().float() / (E2M1_MAX * E4M3_MAX)
        self.slots = 2 * self.tokens
        self.loc = torch.randperm(self.slots, generator=gen, device=setup.device)[: self.tokens]
        self.encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        heads, dim = self.x.shape[1:]
        data = torch.zeros(self.slots, heads, dim // 2, dtype=torch.uint8, device=self.x.device)
        scales = torch.zeros(
            self.slots, heads, dim // FP4_BLOCK_SIZE, dtype=torch.uint8, device=self.x.device
        )
        return data, scales


def _op_runner(
    op: str, fmt: str, backend: TorchBackend, t: _Tensors
) -> tuple[Callable[[], object], Callable[[], Any]]:
    """``(run, output)``: the timed call and a function returning what it produced, for comparison."""
    g = t.g if fmt in NVFP4_WRITERS else None
    if op == "quantize":
        result: dict[str, Any] = {}

        def run() -> object:
            result["out"] = backend.quantize(fmt, t.x2d, g)
            return result["out"]

        return run, lambda: result["out"]
    if op == "dequantize":
        packed, scales = t.encoded[fmt]
        result = {}

        def run() -> object:
            result["out"] = backend.dequantize(fmt, packed, scales, g, torch.bfloat16)
            return result["out"]

        return run, lambda: result["out"]
    if op == "store":
        data, scales = t.buffers()
        return (lambda: backend.quantize_and_store(fmt, data, scales, t.loc, t.x, g)), lambda: (data, scales)
    data, scales = t.cache[fmt]
    result = {}

    def run() -> object:
        result["out"] = backend.dequantize_gather(fmt, data, scales, t.loc, g, torch.bfloat16)
        return result["out"]

    return run, lambda: result["out"]


def _same_bytes(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(_same_bytes(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run_kernel_bench(setup: BenchSetup, copy_gbps: float) -> Iterator[KernelTiming]:
    """Measure every case of ``setup`` (see :meth:`BenchSetup.cases`), yielding one record each."""
    tensors: _Tensors | None = None
    reference_out: Any = None
    for elements, fmt, op, name in setup.cases():
        if tensors is None or tensors.x.numel() != elements:
            tensors = None
            torch.cuda.empty_cache()
            tensors = _Tensors(setup, elements)
            for f in FORMATS:
                g = tensors.g if f in NVFP4_WRITERS else None
                tensors.encoded[f] = setup.backends["torch"].quantize(f, tensors.x2d, g)
                data, scales = tensors.buffers()
                setup.backends["torch"].quantize_and_store(f, data, scales, tensors.loc, tensors.x, g)
                tensors.cache[f] = (data, scales)
        run, output = _op_runner(op, fmt, setup.backends[name], tensors)
        run()
        torch.cuda.synchronize()
        out = output()
        if name == "torch":
            reference_out, bit_exact = out, None
        else:
            bit_exact = _same_bytes(out, reference_out)
        ms = _time_ms(run)
        gbps = _moved_bytes(op, elements, tensors.tokens, tensors.x.element_size()) / ms / 1e6
        yield KernelTiming(
            fmt=fmt,
            op=op,
            backend=name,
            elements=elements,
            tokens=tensors.tokens,
            ms=ms,
            gbps=gbps,
            pct_of_copy=100 * gbps / copy_gbps,
            bit_exact=bit_exact,
        )


def write_report(
    out_dir: Path, machine: dict[str, Any], setup: BenchSetup, copy_gbps: float, timings: list[KernelTiming]
) -> tuple[Path, Path]:
    """Save ``bench_kernels.json`` and ``bench_kernels.png`` under ``out_dir``; returns both paths."""
    json_path, png_path = out_dir / JSON_NAME, out_dir / PNG_NAME
    write_json_atomic(
        json_path,
        {
            "machine": machine,
            "layout": {"heads": setup.heads, "head_dim": setup.head_dim, "input_dtype": "bfloat16"},
            "copy_gbps": copy_gbps,
            "timing": "triton.testing.do_bench median, L2 flushed before each run",
            "results": [asdict(t) for t in timings],
        },
    )
    with atomic_path(png_path) as tmp:
        plot_timings(machine, copy_gbps, timings).savefig(tmp, format="png", dpi=120)
    return json_path, png_path


def plot_timings(machine: dict[str, Any], copy_gbps: float, timings: list[KernelTiming]) -> Any:
    """A 2x2 figure (one panel per op) of GB/s against elements, one line per format and backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    styles = {"triton": "-", "flashinfer": "--", "torch": ":"}
    colors = {"nvfp4": "tab:green", "nvfp4_4over6": "tab:olive", "blockfp4": "tab:blue"}
    for ax, op in zip(axes.flat, OPS, strict=True):
        for fmt in FORMATS:
            for backend, style in styles.items():
                points = [t for t in timings if t.op == op and t.fmt == fmt and t.backend == backend]
                if points:
                    ax.plot(
                        [t.elements for t in points],
                        [t.gbps for t in points],
                        style,
                        marker="o",
                        markersize=3,
                        color=colors[fmt],
                        label=f"{fmt} {backend}",
                    )
        ax.axhline(copy_gbps, color="gray", linestyle="-.", linewidth=1, label="device copy")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("elements (tokens x heads x head_dim)")
        ax.set_ylabel("effective GB/s (read + write)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"FP4 KV kernels on {machine['gpu']} (torch {machine['torch']}, triton {machine['triton']}, "
        f"flashinfer {machine['flashinfer']})"
    )
    return fig


__all__ = [
    "BenchSetup",
    "KernelTiming",
    "copy_bandwidth",
    "default_sizes",
    "machine_info",
    "make_setup",
    "run_kernel_bench",
    "runs_natively",
    "write_report",
]
