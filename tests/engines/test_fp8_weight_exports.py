"""KV scales merged into FP8-weight checkpoints quantized by the libraries that write them: a
ModelOpt FP8 checkpoint (``modelopt.torch.quantization`` + ``export_hf_checkpoint``) and a
transformers fine-grained FP8 one (its own ``Fp8Quantize``).

The ModelOpt merge has the layout ModelOpt itself writes when it quantizes the KV cache too (same
tensor names, dtypes and shapes, same ``hf_quant_config.json`` quantization block), TensorRT-LLM's
loader (re-implemented, tests/engine_loaders/trtllm.py) reads the scales from it, ``inspect``
finds no hazard, and vLLM's own loader (``vllm_modelopt_probe.py``, in its own process) gives
every attention layer exactly the scale the export report says vLLM uses, for both checkpoints.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_loaders import trtllm
from engine_loaders.fixtures import scales_dict, write_scales
from safetensors import safe_open
from typer.testing import CliRunner

from engines.engine_exports import LAYERS, save_model
from fp4kv_cli.cli import app
from fp4kv_cli.export.inspect import inspect_path

mtq = pytest.importorskip(
    "modelopt.torch.quantization", reason="pip install nvidia-modelopt (the engines extra)"
)

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("vllm_modelopt_probe.py")
cli = CliRunner()
#: export-scales options per KV dtype (NVFP4: TensorRT-LLM's sm100 convention, amax / 448).
EXPORT = {
    "fp8": ("--kv-dtype", "fp8"),
    "nvfp4": ("--kv-dtype", "nvfp4", "--engine", "trtllm", "--target", "sm100"),
}
MODELOPT_KV = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG"}


def _modelopt_fp8(source: Path, out: Path, kv: str | None = None) -> Path:
    """``source`` quantized by ModelOpt to per-tensor FP8 weights and activations (and the KV
    cache in ``kv``'s ModelOpt config), exported as ModelOpt writes a Hugging Face checkpoint."""
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16)
    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if kv is not None:
        config["quant_cfg"] = [*config["quant_cfg"], *getattr(mtq, MODELOPT_KV[kv])["quant_cfg"]]
    ids = torch.arange(1, 33)[None]
    mtq.quantize(model, config, lambda m: m(ids))
    export_hf_checkpoint(model, export_dir=out)
    return out


def _finegrained_fp8(source: Path, out: Path) -> Path:
    """``source`` in transformers' fine-grained FP8 (128 x 128 blocks: vLLM's CPU kernel's)."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_fp8_weights import _finegrained_fp8 as quantize

    return quantize(source, out, block=128)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8w")
    dense = save_model("llama", root / "dense")
    made = {"dense": dense, "modelopt": _modelopt_fp8(dense, root / "modelopt")}
    for kv in MODELOPT_KV:
        made[f"modelopt+{kv}"] = _modelopt_fp8(dense, root / f"modelopt-{kv}", kv)
    made["fine-grained"] = _finegrained_fp8(dense, root / "fine-grained")
    made["scales"] = write_scales(root / "scales.json", scales_dict(dense, per_head=False))
    return made


def _export(folders: dict[str, Path], source: str, out: Path, *args: str) -> dict:
    result = cli.invoke(app, ["export-scales", str(folders["scales"]), "--model-dir", str(folders[source]),
                              "--out", str(out), *args])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads((out / "fp4kv_kv_scales.json").read_text())


def _tensors(folder: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    found = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  # safe_open is not a mapping
                tensor = handle.get_tensor(name)
                found[name] = (
                    tensor.dtype,
                    tuple(tensor.shape),
                    tensor.reshape(-1).view(torch.uint8).numpy().tobytes(),
                )
    return found


@pytest.mark.parametrize("kv", list(EXPORT))
def test_modelopt_fp8_merge_has_modelopts_own_kv_layout(
    folders: dict[str, Path], tmp_path: Path, kv: str
) -> None:
    report = _export(folders, "modelopt", tmp_path / "merged", "--format", "modelopt", *EXPORT[kv])
    merged, source, own = (
        _tensors(tmp_path / "merged"),
        _tensors(folders["modelopt"]),
        _tensors(folders[f"modelopt+{kv}"]),
    )
    assert {n: t[:2] for n, t in merged.items()} == {
        n: t[:2] for n, t in own.items()
    }  # names, dtypes, shapes
    assert all(merged[name] == tensor for name, tensor in source.items())  # every FP8 weight byte kept
    hf = json.loads((tmp_path / "merged" / "hf_quant_config.json").read_text())["quantization"]
    assert hf == json.loads((folders[f"modelopt+{kv}"] / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())["quantization_config"]
    theirs = json.loads((folders[f"modelopt+{kv}"] / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in config.items() if k in theirs and k != "producer"} == {
        k: v for k, v in theirs.items() if k != "producer"
    }
    trt = next(c for c in report["consumers"] if c["engine"] == "trtllm")
    assert trt["reads_scales"]
    assert trtllm.kv_scales(tmp_path / "merged", LAYERS) == [
        (row["k_used"], row["v_used"]) for row in trt["layers"]
    ]
    inspected = inspect_path(tmp_path / "merged")
    assert inspected["convention"] == "448"
    assert not [h for h in inspected["hazards"] if "trtllm" in h.lower() or "vllm" in h.lower()], inspected[
        "hazards"
    ]
    if kv == "fp8":
        assert inspected["hazards"] == []


@pytest.mark.slow
@pytest.mark.parametrize("source", ["modelopt", "fine-grained"])
def test_vllm_loads_the_merged_scales(folders: dict[str, Path], tmp_path: Path, source: str) -> None:
    fmt = "modelopt" if source == "modelopt" else "fp8"
    report = _export(folders, source, tmp_path / "merged", "--format", fmt, *EXPORT["fp8"])
    result = tmp_path / "probe.json"
    # fine-grained FP8 needs bf16 activations on vLLM's CPU kernel; the probe runs no forward
    dtype = "float16" if source == "modelopt" else "bfloat16"
    done = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "merged"), str(result), dtype],
                          check=False, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    probed = json.loads(result.read_text())
    vllm = next(c for c in report["consumers"] if c["engine"] == "vllm")
    assert vllm["reads_scales"]
    method = {
        "modelopt": ("ModelOptFp8Config", "ModelOptKVCacheMethod"),
        "fine-grained": ("Fp8Config", "Fp8KVCacheMethod"),
    }
    for row in vllm["layers"]:
        layer = probed["layers"][str(row["index"])]
        assert (layer["quant_config"], layer["method"]) == method[source]
        assert layer["kv_cache_dtype"] == "fp8" and (layer["k_scale"], layer["v_scale"]) == (
            row["k_used"],
            row["v_used"],
        )
    assert {linear["dtype"] for linear in probed["linear"].values()} == {"torch.float8_e4m3fn"}
