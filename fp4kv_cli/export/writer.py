"""Build an export folder atomically: hard links to unchanged files, new files beside them.

The source folder is never written to. Unchanged files are hard-linked (copied when the
destination is on another device or links are refused); ``config.json`` and other rewritten
files are new files, so editing them never touches the originals. The folder is built in a
temp dir beside ``out`` and renamed into place only when complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fp4kv_cli.atomic import atomic_path
from fp4kv_cli.errors import FP4KVError

#: Writes one new file at the given path.
FileWriter = Callable[[Path], None]


@dataclass(frozen=True)
class WrittenFile:
    """One file of the export and how it got there: linked, copied, new or rewritten."""

    name: str
    how: str


def check_destination(out: Path, sources: Iterable[Path], overwrite: bool) -> None:
    """Refuse ``out`` inside (or equal to, or containing) a source folder, or existing without
    ``overwrite``."""
    resolved = out.resolve()
    for source in sources:
        src = source.resolve()
        if resolved == src or src in resolved.parents:
            raise FP4KVError(f"--out {out} is inside the source folder {source}; write it somewhere else")
        if resolved in src.parents:
            raise FP4KVError(f"--out {out} contains the source folder {source}; write it somewhere else")
    if out.exists() and not overwrite:
        raise FP4KVError(f"{out} already exists; pass --overwrite or choose another --out")


def write_folder(
    source: Path, out: Path, new_files: dict[str, FileWriter], skip: set[str], overwrite: bool
) -> list[WrittenFile]:
    """Create ``out``: every file of ``source`` except ``skip`` and ``new_files`` linked in,
    then each of ``new_files`` written. Atomic: on any error nothing appears at ``out``."""
    check_destination(out, [source], overwrite)
    written: list[WrittenFile] = []
    try:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for path in sorted(source.rglob("*")):
                rel = path.relative_to(source).as_posix()
                if path.is_dir() or rel in skip or rel in new_files:
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                written.append(WrittenFile(rel, _link_or_copy(path, target)))
            for rel, write in new_files.items():
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                write(target)
                target.chmod(_file_mode())
                written.append(WrittenFile(rel, "rewritten" if (source / rel).exists() else "new"))
    except PermissionError as err:
        raise FP4KVError(f"cannot write {out}: {err.strerror}; choose a writable --out") from None
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC):
            raise FP4KVError(f"cannot write {out}: {err.strerror}; choose a writable --out") from None
        raise
    return written


def write_file(out: Path, write: FileWriter, sources: Iterable[Path], overwrite: bool) -> None:
    """Write one file at ``out`` atomically, with the same destination checks as a folder."""
    check_destination(out, sources, overwrite)
    try:
        with atomic_path(out) as tmp:
            write(tmp)
            tmp.chmod(_file_mode())
    except PermissionError as err:
        raise FP4KVError(f"cannot write {out}: {err.strerror}; choose a writable --out") from None
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC):
            raise FP4KVError(f"cannot write {out}: {err.strerror}; choose a writable --out") from None
        raise


def _file_mode() -> int:
    """``0o666`` minus the process umask: what a plainly created file would get."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst, follow_symlinks=True)
        return "linked"
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    shutil.copy2(src, dst)
    return "copied"


def copy_shard_without(src: Path, dst: Path, drop: set[str]) -> int:
    """Copy the safetensors file ``src`` to ``dst`` leaving out the tensors named in ``drop``.

    Streams tensor bytes (no full load into memory). Returns the bytes of data kept.
    Format: 8-byte little-endian header length, JSON header, then the data buffer.
    """
    with open(src, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        data_start = 8 + header_len
        metadata = header.pop("__metadata__", None)
        kept = sorted(
            ((name, info) for name, info in header.items() if name not in drop),
            key=lambda item: item[1]["data_offsets"][0],
        )
        new_header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
        offset = 0
        for name, info in kept:
            begin, end = info["data_offsets"]
            new_header[name] = {**info, "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
        encoded = json.dumps(new_header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(dst, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for _, info in kept:
                begin, end = info["data_offsets"]
                handle.seek(data_start + begin)
                remaining = end - begin
                while remaining:
                    chunk = handle.read(min(remaining, 1 << 24))
                    out.write(chunk)
                    remaining -= len(chunk)
    return offset
