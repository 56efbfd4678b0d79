"""Data-parallel ``fp4kv eval gsm8k``: one process per device under an existing launcher
(``torchrun --nproc-per-node N -m fp4kv_cli eval gsm8k ...``, or ``accelerate launch``, which
sets the same environment), the questions sharded by batch, the samples merged into one run
folder.

The batches are the single-process run's: the rows still to score, in the run's row order
(longest prompt first), cut into ``--batch-size`` chunks; rank ``r`` generates chunks ``r, r + N,
r + 2N, ...``. Each batch holds the same rows as in a one-process run, so each row's output (and
the batch-dependent fields of its record: prefill row chunk, KV bytes) is the same. Rank ``r``
appends its records to ``shards/samples-<kv>.rank<r>.jsonl``, a file no other rank writes; rank 0
alone writes every shared file (``config.json``, ``wall.json``, ``fidelity.json``,
``samples-<kv>.jsonl``, ``summary.*``). At the end rank 0 folds the shards into
``samples-<kv>.jsonl`` and rewrites it in row order, which is the order a one-process run appends
in, so the file is the same whatever the number of processes or of resumed sessions.

A killed run resumes with ``--resume`` under any number of processes (one included): rank 0
first folds the shards the killed session left into ``samples-<kv>.jsonl`` (dropping a line cut
short), then every rank reads what is done and takes its share of the rest.

The processes exchange only barriers and a few small objects (the automatic batch plans), over
gloo on every device: no tensor crosses processes, so NCCL would add nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from fp4kv_cli.atomic import atomic_path
from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.evaluate.results import SampleLog, samples_path
from fp4kv_cli.models import resolve_device

T = TypeVar("T")
#: How long a process waits at a barrier for the others (their model load, the longest shard).
BARRIER_TIMEOUT = timedelta(hours=6)
SHARDS = "shards"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launcher's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Ranks:
        """The ranks ``torchrun`` / ``accelerate launch`` set (``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``); rank 0 of 1 without them. More than one machine is a one-line error:
        the ranks merge through the run folder, which must be one folder."""
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local_rank = int(environ.get("LOCAL_RANK", str(rank)))
            local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError:
            raise FP4KVError(
                "RANK / WORLD_SIZE / LOCAL_RANK are not integers; launch with torchrun"
            ) from None
        if world > 1 and local_world != world:
            raise FP4KVError(
                f"data-parallel eval runs on one machine ({local_world} of {world} processes here); "
                "launch with torchrun --nnodes 1 --nproc-per-node N"
            )
        return cls(rank, world, local_rank)

    @property
    def parallel(self) -> bool:
        """Whether several processes share the run."""
        return self.world > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run folder's shared files (rank 0)."""
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of ``--device name`` for this rank: ``auto`` / ``cuda`` are
        ``cuda:LOCAL_RANK`` (made the current device) when processes share the run."""
        device = resolve_device(name)
        if not self.parallel or device.type != "cuda":
            return device
        if name not in ("auto", "cuda"):
            raise FP4KVError(
                f"--device {name} under a data-parallel launch; pass --device cuda (rank r runs on cuda:r)"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise FP4KVError(
                f"rank {self.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "launch at most one process per GPU"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    @contextmanager
    def group(self) -> Iterator[Ranks]:
        """The gloo process group of a data-parallel run for the duration of the block (nothing
        for one process)."""
        if not self.parallel:
            yield self
            return
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=BARRIER_TIMEOUT)
        try:
            yield self
        finally:
            dist.destroy_process_group()

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order."""
        if not self.parallel:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def share(self, batches: Sequence[T]) -> list[T]:
        """This rank's batches of ``batches``: every ``world``-th from its rank."""
        return list(batches[self.rank :: self.world])


def shard_path(run_dir: Path, kv: str, rank: int) -> Path:
    """``shards/samples-<kv>.rank<rank>.jsonl``: the samples rank ``rank`` scored this session."""
    return run_dir / SHARDS / f"samples-{kv}.rank{rank}.jsonl"


def fold_shards(
    run_dir: Path, kv: str, key: Callable[[dict[str, Any]], Hashable]
) -> dict[Any, dict[str, Any]]:
    """Rank 0: append the records of every ``shards/samples-<kv>.rank*.jsonl`` that
    ``samples-<kv>.jsonl`` lacks to it (a line cut short by a kill is dropped), delete the
    shards, and return every record of the merged file by key."""
    merged = SampleLog(samples_path(run_dir, kv), key)
    records = merged.load()
    for path in sorted((run_dir / SHARDS).glob(f"samples-{kv}.rank*.jsonl")):
        fresh = [r for k, r in SampleLog(path, key).load().items() if k not in records]
        merged.append(fresh)
        records.update((key(r), r) for r in fresh)
        path.unlink()
    return records


def remove_shard_folder(run_dir: Path) -> None:
    """Rank 0: remove ``shards/`` once every shard in it is folded (kept if anything is left)."""
    try:
        (run_dir / SHARDS).rmdir()
    except OSError:
        pass


def write_in_order(
    run_dir: Path, kv: str, records: Mapping[Any, dict[str, Any]], order: Sequence[Hashable]
) -> None:
    """Rank 0: rewrite ``samples-<kv>.jsonl`` (atomically) with the records of ``order`` in that
    order, then any others (an earlier session's extra samples) in file order; nothing is
    written when the file is in that order already."""
    listed = set(order)
    keys = [k for k in order if k in records] + [k for k in records if k not in listed]
    text = "".join(json.dumps(records[k], ensure_ascii=False) + "\n" for k in keys)
    path = samples_path(run_dir, kv)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def open_shards(
    run_dir: Path, kv_dtypes: Sequence[str], key: Callable[[dict[str, Any]], Hashable], parallel: bool
) -> None:
    """Rank 0, before the ranks generate: fold what a killed data-parallel session left in
    ``shards/`` into the samples files (each repaired of a line cut short), then leave an empty
    ``shards/`` for this session's ranks (none for one process)."""
    for kv in kv_dtypes:
        fold_shards(run_dir, kv, key)
    remove_shard_folder(run_dir)
    if parallel:
        (run_dir / SHARDS).mkdir(exist_ok=True)
