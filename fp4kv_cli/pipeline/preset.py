"""Pipeline presets: TOML files under ``configs/`` that ``fp4kv run`` executes end to end.

A preset names a model and the settings of each step (calibrate -> export -> inspect -> eval);
a step whose table is absent is not run. Parsed with :mod:`tomllib` and validated by pydantic
models that forbid unknown keys, so a typo is an error naming the key, not a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fp4kv_cli.errors import FP4KVError
from fp4kv_cli.fetch import MODELS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Where the model comes from: ``fetch`` (a :data:`fp4kv_cli.fetch.MODELS` key, fetched once
    into ``~/.cache/fp4kv/models``) or ``path`` (a folder, ``.gguf`` file or hub id). A GGUF is
    converted once into ``OUT/model`` when ``convert`` is true (every later step then loads the
    folder in seconds)."""

    fetch: Literal[tuple(MODELS)] | None = None  # type: ignore[valid-type]
    path: str | None = None
    convert: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.fetch is None) == (self.path is None):
            raise ValueError("give exactly one of fetch or path")
        return self


class CalibrateSpec(_Strict):
    """``fp4kv calibrate`` options (the shipped GSM8K train split unless ``dataset``)."""

    num_samples: int = Field(512, gt=0)
    seq_len: int = Field(1024, gt=0)
    batch_size: int = Field(8, gt=0)
    per_head: bool = True
    center_k: bool = False
    dataset: str | None = None
    device: str = "auto"
    dtype: str = "auto"


class ExportSpec(_Strict):
    """``fp4kv export-scales`` options; the export goes into ``OUT/export-<kv_dtype>-<format>``."""

    kv_dtype: Literal["nvfp4", "fp8"] = "nvfp4"
    format: Literal["modelopt", "compressed-tensors", "json"] = "modelopt"
    target: Literal["sm90", "sm100", "sm120"] | None = None
    engine: Literal["sglang", "vllm", "trtllm"] | None = None
    convention: Literal["448", "6x448"] | None = None
    per_head: bool = True


class EvalSpec(_Strict):
    """``fp4kv eval gsm8k`` options; the run folder is ``OUT/eval``."""

    kv_dtypes: list[Literal["bf16", "fp8", "nvfp4", "blockfp4", "recipe"]] = ["bf16", "fp8", "nvfp4", "blockfp4"]
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    num_fewshot: int = Field(5, ge=0)
    fidelity: bool = True
    fidelity_samples: int = Field(8, gt=0)
    device: str = "auto"
    dtype: str = "auto"
    decode_attention: Literal["graph", "fused", "gather"] = "graph"


class Preset(_Strict):
    """One pipeline: a model, where its outputs go, and each step's settings."""

    name: str
    description: str = ""
    out: str = Field(description="folder of every output (relative paths: from the working directory)")
    model: ModelSpec
    #: A ready scales file (e.g. a published recipe) instead of calibrating; a relative path is
    #: from the preset file's folder.
    scales: str | None = None
    calibrate: CalibrateSpec | None = None
    export: ExportSpec | None = None
    eval: EvalSpec | None = None

    @model_validator(mode="after")
    def _scales_source(self) -> Preset:
        if self.scales is not None and self.calibrate is not None:
            raise ValueError("give scales or a [calibrate] table, not both")
        if self.export is not None and self.scales is None and self.calibrate is None:
            raise ValueError("[export] needs scales: add a [calibrate] table or a scales file")
        return self


def load_preset(path: str | Path) -> Preset:
    """The preset at ``path``; raises :class:`FP4KVError` (one line, naming the key) when the file
    is missing, not TOML, or has an unknown, missing or invalid key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FP4KVError(f"cannot read preset {path}: {err.strerror or err}; pass a configs/<name>.toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FP4KVError(f"{path} is not valid TOML ({err}); fix the file") from None
    try:
        return Preset.model_validate(data)
    except ValidationError as err:
        raise FP4KVError(f"{path}: {_first_problem(err)}") from None


def _first_problem(err: ValidationError) -> str:
    """``key a.b: problem; fix`` of the first validation error."""
    first: dict[str, Any] = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key}; remove it or check its spelling (see configs/README.md)"
    if kind == "missing":
        return f"missing key {key}; add it (see configs/README.md)"
    message = first["msg"].removeprefix("Value error, ")
    return f"key {key}: {message}, got {first.get('input')!r}; fix its value"
