"""Sweep the Triton FP4 quantize kernel's launch variants on a CUDA GPU (or check them all on CPU).

Configurations are settings of the ``QUANTIZE_*`` constants of
``fp4kv_cli/quant/kernels/triton_fp4.py`` around the shipped ones: every combination of the
wide int64 store, the whole-block load and the PTX cache hints; tile elements x warps with and
without the two layout flags; persistent grids with pipelined loops. For each one, NVFP4 and
BlockFP4 quantize of one bf16 tensor (``--tokens x 128``, default 64M elements) are timed from a
CUDA graph (``triton.testing.do_bench_cudagraph``, median: the kernel without its launch) and
their bytes compared with those of the shipped launch on that tensor and with the PyTorch
reference (run on CPU) on random bf16 bit patterns (zeros, -0, subnormals, +-inf, huge values).
One line per configuration: effective GB/s (2 bytes read, 0.5625 written per element) and
whether the bytes are equal. The fastest exact ones (NVFP4 + BlockFP4 time) and the shipped one
are timed again, longer, and also eagerly with L2 flushed (``do_bench``, as docs/benchmarks.md
measures); the winner's constants are printed and everything is saved as JSON. Kernels are
compiled first by ``--workers`` processes (Triton's on-disk cache). ``--dequantize`` also sweeps
the dequantize kernel's tile elements x warps (NVFP4).

Under ``TRITON_INTERPRET=1`` (no GPU needed) the kernels run interpreted on CPU tensors: with a
tiny ``--tokens`` that checks every configuration's bytes; its timings mean nothing.

usage: python scripts/tune_fp4_kernels.py [--tokens 524288] [--check-tokens 16384] [--workers 15]
       [--top 6] [--dequantize] [--out tune_fp4_kernels.json]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fp4kv_cli.atomic import write_json_atomic
from fp4kv_cli.quant.backend import TorchBackend
from fp4kv_cli.quant.kernels import triton_fp4
from fp4kv_cli.quant.methods import NVFP4KVMethod

FORMATS = ("nvfp4", "blockfp4")
HEAD_DIM = 128
#: Bytes quantize moves per element: bf16 read, packed E2M1 codes and one scale byte per 16 written.
BYTES_PER_ELEMENT = 2 + 0.5 + 1 / 16
#: The constants a configuration sets (quantize launch), as named in triton_fp4.
QUANTIZE_NAMES = (
    "QUANTIZE_TILE_ELEMENTS",
    "QUANTIZE_WARPS",
    "QUANTIZE_WIDE_STORE",
    "QUANTIZE_WHOLE_LOAD",
    "QUANTIZE_LOAD_CACHE",
    "QUANTIZE_LOAD_EVICT",
    "QUANTIZE_STORE_CACHE",
    "QUANTIZE_PROGRAMS_PER_SM",
    "QUANTIZE_STAGES",
)
#: (cache modifier, eviction policy) of the input loads; PTX rejects ``.cg`` with ``evict_first``.
LOAD_HINTS = (("", ""), (".cg", ""), ("", "evict_first"))
STORE_HINTS = ("", ".cs")
#: (tile elements, warps) with at least one 16-element block per thread at head_dim 128.
SHAPES = ((512, 1), (1024, 1), (1024, 2), (2048, 1), (2048, 2), (2048, 4), (4096, 4))
PERSISTENT_SHAPES = ((1024, 1), (2048, 2))
PROGRAMS_PER_SM = (8, 16, 32)
STAGES = (1, 2, 3, 4)
DEQUANTIZE_TILES = (1024, 2048, 4096, 8192)
DEQUANTIZE_WARPS = (1, 2, 4, 8)

Config = dict[str, object]


def quantize_configs(shipped: Config) -> list[Config]:
    """The configurations to sweep, the shipped one first, each varying a few constants of it."""
    flags = [
        {"QUANTIZE_WIDE_STORE": wide, "QUANTIZE_WHOLE_LOAD": whole, "QUANTIZE_LOAD_CACHE": load_cache,
         "QUANTIZE_LOAD_EVICT": load_evict, "QUANTIZE_STORE_CACHE": store_cache}
        for wide, whole, (load_cache, load_evict), store_cache in itertools.product(
            (False, True), (False, True), LOAD_HINTS, STORE_HINTS
        )
    ]  # fmt: skip
    shapes = [
        {"QUANTIZE_TILE_ELEMENTS": tile, "QUANTIZE_WARPS": warps, "QUANTIZE_WIDE_STORE": wide,
         "QUANTIZE_WHOLE_LOAD": whole}
        for (tile, warps), wide, whole in itertools.product(SHAPES, (False, True), (False, True))
    ]  # fmt: skip
    persistent = [
        {"QUANTIZE_TILE_ELEMENTS": tile, "QUANTIZE_WARPS": warps, "QUANTIZE_WIDE_STORE": True,
         "QUANTIZE_WHOLE_LOAD": whole, "QUANTIZE_PROGRAMS_PER_SM": programs, "QUANTIZE_STAGES": stages}
        for (tile, warps), whole, programs, stages in itertools.product(
            PERSISTENT_SHAPES, (False, True), PROGRAMS_PER_SM, STAGES
        )
    ]  # fmt: skip
    one_per_tile = {"QUANTIZE_PROGRAMS_PER_SM": 0, "QUANTIZE_STAGES": 1}
    flags = [{**one_per_tile, **change} for change in flags]
    shapes = [{**one_per_tile, **change} for change in shapes]
    unique: dict[tuple[tuple[str, object], ...], Config] = {}
    for change in [{}, *flags, *shapes, *persistent]:
        config = {**shipped, **change}
        unique.setdefault(tuple(config.items()), config)
    return list(unique.values())


@contextmanager
def launch(config: Config) -> Iterator[None]:
    """Set the kernel module's constants to ``config`` for the duration."""
    saved = {name: getattr(triton_fp4, name) for name in config}
    for name, value in config.items():
        setattr(triton_fp4, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(triton_fp4, name, value)


def describe(config: Config) -> str:
    """One-line summary of a quantize configuration."""
    c = {name.removeprefix("QUANTIZE_"): value for name, value in config.items()}
    hints = f"load {c['LOAD_CACHE'] or '-'}/{c['LOAD_EVICT'] or '-'} store {c['STORE_CACHE'] or '-'}"
    grid = f"persistent {c['PROGRAMS_PER_SM']}/SM x{c['STAGES']}" if c["PROGRAMS_PER_SM"] else "one per tile"
    return (
        f"tile {c['TILE_ELEMENTS']:4d} warps {c['WARPS']} wide {c['WIDE_STORE']:d} whole {c['WHOLE_LOAD']:d} "
        f"{hints:28s} {grid:19s}"
    )


def global_scale(fmt: str, x: torch.Tensor) -> torch.Tensor | None:
    """The calibrated NVFP4 scale ``amax / (6 * 448)`` of x's finite values (0-dim fp32); None for BlockFP4."""
    if fmt != "nvfp4":
        return None
    finite = x.float().nan_to_num(posinf=0.0, neginf=0.0)
    return NVFP4KVMethod().scale_from_amax(finite.abs().amax().clamp_min(1e-30))


def random_bits(tokens: int, device: torch.device) -> torch.Tensor:
    """bf16 ``[tokens, HEAD_DIM]`` of uniform random bit patterns, NaN (whose bytes are unspecified) -> +-inf."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**15), 2**15, (tokens, HEAD_DIM), generator=gen, dtype=torch.int32)
    x = bits.to(torch.int16).view(torch.bfloat16)
    x = torch.where(x.isnan(), torch.copysign(torch.tensor(float("inf"), dtype=x.dtype), x), x)
    return x.to(device)


def time_ms(fn: Callable[[], object], rep: int, graph: bool) -> float:
    """Median time (ms) of ``fn``: replayed from a CUDA graph (the kernel alone) or, eagerly, with
    L2 flushed before each call (as ``fp4kv bench kernels`` measures); one wall-clock call under
    the interpreter. A quantize call's host side (60-100 us) is as long as its kernel, so eager
    timings also measure the host CPU: on a busy one they dropped by up to 40% at random."""
    if triton_fp4.INTERPRETED:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, rep=rep, return_mode="median")


def compile_one(job: tuple[str, Config, int]) -> str | None:
    """Worker process: compile ``(fmt, config)`` by a launch on a small tensor of the timed one's
    specialization, filling Triton's on-disk cache; the error text where it fails."""
    fmt, config, tokens = job
    x = torch.randn(tokens, HEAD_DIM, device="cuda").to(torch.bfloat16)
    try:
        with launch(config):
            triton_fp4.TritonBackend().quantize(fmt, x, global_scale(fmt, x))
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 (a variant the compiler rejects: the sweep records it)
        return f"{type(error).__name__}: {error}"
    return None


def precompile(configs: list[Config], workers: int) -> None:
    """Compile every (format, configuration) in ``workers`` processes before timing anything."""
    jobs = [(fmt, config, 64) for config in configs for fmt in FORMATS]
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        failed = sum(error is not None for error in pool.map(compile_one, jobs))
    print(
        f"compiled {len(jobs)} kernels in {time.perf_counter() - start:.0f} s ({failed} failed)", flush=True
    )


class QuantizeSweep:
    """The inputs and expected bytes every configuration is timed and checked on."""

    def __init__(self, tokens: int, check_tokens: int, device: torch.device) -> None:
        self.backend = triton_fp4.TritonBackend()
        self.x = torch.randn(tokens, HEAD_DIM, device=device).to(torch.bfloat16)
        self.bits = random_bits(check_tokens, device)
        self.scales = {fmt: (global_scale(fmt, self.x), global_scale(fmt, self.bits)) for fmt in FORMATS}
        self.shipped = {fmt: self.backend.quantize(fmt, self.x, self.scales[fmt][0]) for fmt in FORMATS}
        reference = TorchBackend()
        self.reference = {
            fmt: tuple(
                t.to(device) for t in reference.quantize(fmt, self.bits.cpu(), _cpu(self.scales[fmt][1]))
            )
            for fmt in FORMATS
        }

    def measure(self, fmt: str, config: Config, rep: int, eager: bool = False) -> dict[str, object]:
        """GB/s of quantize under ``config`` (CUDA graph; also eager if asked) and whether its bytes
        equal the shipped launch's and the reference's."""
        g, g_bits = self.scales[fmt]
        result: dict[str, object] = {}
        try:
            with launch(config):
                result["equal_shipped"] = _equal(self.backend.quantize(fmt, self.x, g), self.shipped[fmt])
                result["equal_reference"] = _equal(
                    self.backend.quantize(fmt, self.bits, g_bits), self.reference[fmt]
                )
                timers = {"gbs": True, "eager_gbs": False} if eager else {"gbs": True}
                for key, graph in timers.items():
                    ms = time_ms(lambda: self.backend.quantize(fmt, self.x, g), rep, graph)
                    result[key] = self.x.numel() * BYTES_PER_ELEMENT / ms / 1e6
        except Exception as error:  # noqa: BLE001 (e.g. a modifier ptxas rejects): one failed row, not a failed sweep
            return {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
        return result


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


def _equal(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def exact(result: dict[str, object]) -> bool:
    """Whether a measurement ran and wrote the shipped and the reference bytes."""
    return "gbs" in result and bool(result["equal_shipped"]) and bool(result["equal_reference"])


def summary(result: dict[str, object]) -> str:
    """A measurement as printed: GB/s and "exact", or what differs, or the error."""
    if "error" in result:
        return f"error ({result['error'][:60]})"
    speed = f"{result['gbs']:6.0f} GB/s" + (
        f" (eager {result['eager_gbs']:4.0f})" if "eager_gbs" in result else ""
    )
    if exact(result):
        return f"{speed} exact"
    return f"{speed} DIFFERENT (shipped {result['equal_shipped']}, reference {result['equal_reference']})"


def cost(row: dict[str, object], key: str) -> float:
    """Sum over the formats of 1 / GB/s (their total time, up to a factor) of ``row[key]``; inf unless
    every format's bytes were exact."""
    results = [row[key][fmt] for fmt in FORMATS]
    return sum(1 / r["gbs"] for r in results) if all(exact(r) for r in results) else float("inf")


def sweep_quantize(
    sweep: QuantizeSweep, configs: list[Config], top: int
) -> tuple[list[dict[str, object]], Config | None]:
    """Time every configuration, then the ``top`` fastest exact ones and the shipped one again
    (longer); the rows and the fastest exact configuration (None if none is exact)."""
    rows = []
    for index, config in enumerate(configs, 1):
        row = {"config": config, "sweep": {fmt: sweep.measure(fmt, config, rep=20) for fmt in FORMATS}}
        rows.append(row)
        results = ", ".join(f"{fmt} {summary(row['sweep'][fmt])}" for fmt in FORMATS)
        print(f"[{index:3d}/{len(configs)}] {describe(config)}: {results}", flush=True)
    finalists = sorted(
        (row for row in rows if cost(row, "sweep") < float("inf")), key=lambda r: cost(r, "sweep")
    )
    print(f"--- the {top} fastest exact configurations and the shipped one, timed again, longer, and eagerly")
    for row in {id(r): r for r in [*finalists[:top], rows[0]]}.values():
        row["confirm"] = {fmt: sweep.measure(fmt, row["config"], rep=100, eager=True) for fmt in FORMATS}
        results = ", ".join(f"{fmt} {summary(row['confirm'][fmt])}" for fmt in FORMATS)
        print(f"{describe(row['config'])}: {results}", flush=True)
    confirmed = [row for row in rows if "confirm" in row and cost(row, "confirm") < float("inf")]
    best = min(confirmed, key=lambda r: cost(r, "confirm"), default=None)
    return rows, None if best is None else best["config"]


def copy_gbs(x: torch.Tensor) -> dict[str, float]:
    """Device-to-device copy of ``x`` (bytes read + written per second / 1e9), the ceiling the
    quantize figures compare with, timed both ways."""
    out = torch.empty_like(x)
    return {
        key: 2 * x.nbytes / time_ms(lambda: out.copy_(x), 100, graph) / 1e6
        for key, graph in (("gbs", True), ("eager_gbs", False))
    }


def sweep_dequantize(backend: triton_fp4.TritonBackend, x: torch.Tensor) -> list[dict[str, object]]:
    """NVFP4 dequantize (to bf16) per tile elements x warps, bytes checked against the shipped launch;
    GB/s count the same bytes as quantize's (the directions swapped)."""
    g = global_scale("nvfp4", x)
    packed, scales = backend.quantize("nvfp4", x, g)
    want = backend.dequantize("nvfp4", packed, scales, g, torch.bfloat16)
    rows = []
    for tile, warps in itertools.product(DEQUANTIZE_TILES, DEQUANTIZE_WARPS):
        with launch({"DEQUANTIZE_TILE_ELEMENTS": tile, "DEQUANTIZE_WARPS": warps}):
            equal = torch.equal(backend.dequantize("nvfp4", packed, scales, g, torch.bfloat16), want)
            ms = time_ms(
                lambda: backend.dequantize("nvfp4", packed, scales, g, torch.bfloat16), 20, graph=True
            )
        rows.append(
            {
                "tile": tile,
                "warps": warps,
                "gbs": x.numel() * BYTES_PER_ELEMENT / ms / 1e6,
                "bytes_equal": equal,
            }
        )
        print(
            f"dequantize tile {tile:5d} warps {warps}: {rows[-1]['gbs']:6.0f} GB/s, bytes equal {equal}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens", type=int, default=524288, help="rows of 128 elements timed (default: 64M elements)"
    )
    parser.add_argument(
        "--check-tokens",
        type=int,
        default=16384,
        help="rows of random bit patterns checked against the reference",
    )
    parser.add_argument(
        "--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)), help="compile processes"
    )
    parser.add_argument("--top", type=int, default=6, help="fastest configurations timed again")
    parser.add_argument(
        "--dequantize", action="store_true", help="also sweep dequantize tile elements x warps"
    )
    parser.add_argument("--out", default="tune_fp4_kernels.json")
    args = parser.parse_args()
    if not (triton_fp4.INTERPRETED or torch.cuda.is_available()):
        parser.error("needs a CUDA GPU, or TRITON_INTERPRET=1 to check the variants on CPU")
    from bench_calibrate import machine  # imports transformers: kept out of the compile workers

    device = torch.device("cpu" if triton_fp4.INTERPRETED else "cuda")
    shipped = {name: getattr(triton_fp4, name) for name in QUANTIZE_NAMES}
    configs = quantize_configs(shipped)
    print(
        f"{len(configs)} quantize configurations x {len(FORMATS)} formats on {args.tokens} x {HEAD_DIM} bf16"
    )
    if device.type == "cuda":
        precompile(configs, args.workers)
    sweep = QuantizeSweep(args.tokens, args.check_tokens, device)
    copy = copy_gbs(sweep.x)
    print(f"copy of the input: {copy['gbs']:.0f} GB/s (eager {copy['eager_gbs']:.0f})", flush=True)
    rows, best = sweep_quantize(sweep, configs, args.top)
    if best is None:
        print("no configuration wrote the expected bytes")
    else:
        print("fastest exact configuration (NVFP4 + BlockFP4), as constants of triton_fp4.py:")
        for name, value in best.items():
            print(
                f"    {name} = {value!r}"
                + ("" if value == shipped[name] else f"  # shipped: {shipped[name]!r}")
            )
    out = {
        "machine": machine(),
        "elements": sweep.x.numel(),
        "copy": copy,
        "shipped": shipped,
        "best": best,
        "rows": rows,
    }
    if args.dequantize:
        out["dequantize"] = sweep_dequantize(sweep.backend, sweep.x)
    write_json_atomic(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
