"""Write a pre-quantized copy of a diffusers model folder that engine.quant.api.build_transformer loads directly.

Every component except transformer/ is hard-linked (copied where links cannot be made) unchanged. transformer/
gets one safetensors file in the ModelOpt layout with diffusers key names: each quantized module's `weight` is
replaced by the format's tensors (NVFP4: uint8 weight [N, K/2], e4m3 weight_scale [N, K/16], fp32 weight_scale_2;
fp8-wo: e4m3 weight [N, K], fp32 weight_scale [N]), everything else is kept bit for bit, and hf_quant_config.json
names the algorithm and lists every linear left in high precision in exclude_modules.

Which modules are quantized is decided by the engine's own walk (engine.quant.api.select_linears on a meta-device
build) and each checkpoint tensor is quantized by the same function the engine's online path calls, so a folder
written here dequantizes to exactly the weights online quantization of the source folder gives (when the engine
loads in the stored dtype: online quantization starts from the weights cast to the compute dtype).

NVFP4 folders carry no input_scale: the tool sees no activations to calibrate on. The engine then computes the
activation global scale per call (see NVFP4Linear); runtimes that require a static input_scale cannot run these
folders in W4A4.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.loading import read_config, safetensors_files
from engine.quant.api import QuantSpec, checkpoint_shapes, packed_from_key_map, select_linears
from engine.quant.prequantized import CONFIG_NAME

# format -> (quant_algo written to hf_quant_config.json, engine quant mode whose walk and linear class are used)
FORMATS = {"nvfp4": ("NVFP4", "nvfp4"), "fp8-wo": ("FP8_PER_CHANNEL_PER_TOKEN", "fp8-wo")}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _flux1(transformer_dir: Path):
    from engine.models.flux1 import Flux1Config, Flux1Transformer, diffusers_key_map

    cfg = Flux1Config.from_diffusers(read_config(transformer_dir))
    return (lambda: Flux1Transformer(cfg)), diffusers_key_map(cfg)


# diffusers pipeline class (model_index.json's _class_name) -> (build, key_map) of the engine transformer.
TRANSFORMERS: dict[str, Callable[[Path], tuple]] = {"FluxPipeline": _flux1}


def quantize_folder(model_dir, fmt: str, out_dir, keep_bf16: tuple[str, ...] = ()) -> Path:
    """Write the quantized folder at `out_dir` (which must not exist or be empty) and return its path.

    keep_bf16: --quant-ignored-layers patterns (engine or diffusers names; a pattern naming part of a fused module
    keeps the whole fused module). A pattern that matches nothing raises ValueError. The folder is assembled in a
    temp dir next to `out_dir` and renamed into place, so nothing half-written is ever visible."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; valid: {sorted(FORMATS)}")
    model_dir, out_dir = Path(model_dir).absolute(), Path(out_dir).absolute()
    src = model_dir / "transformer"
    if (src / CONFIG_NAME).is_file():
        raise ValueError(f"{src} is already quantized ({CONFIG_NAME} present)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")
    tensors, quant_config = _quantized_transformer(model_dir, src, fmt, tuple(keep_bf16))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        for entry in model_dir.iterdir():
            if entry.name != "transformer":
                _link_tree(entry, tmp / entry.name)
        (tmp / "transformer").mkdir()
        for entry in src.iterdir():  # config and anything else that is not the weights
            if not (entry.name.endswith(".safetensors") or entry.name.endswith(".safetensors.index.json")):
                _link_tree(entry, tmp / "transformer" / entry.name)
        save_file(tensors, str(tmp / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "transformer" / CONFIG_NAME).write_text(json.dumps(quant_config, indent=2) + "\n")
        os.replace(tmp, out_dir)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _quantized_transformer(model_dir: Path, src: Path, fmt: str, keep_bf16: tuple[str, ...]):
    index = json.loads((model_dir / "model_index.json").read_text())
    family = index.get("_class_name")
    if family not in TRANSFORMERS:
        raise ValueError(f"no engine transformer for pipeline {family!r}; known: {sorted(TRANSFORMERS)}")
    build, key_map = TRANSFORMERS[family](src)
    algo, mode = FORMATS[fmt]
    spec = QuantSpec(mode, ignored=keep_bf16)
    with torch.device("meta"):
        model = build()
    packed = packed_from_key_map(key_map, checkpoint_shapes(src))
    chosen = select_linears(model, spec, packed)
    quantized = {s for name in chosen for s in packed[name].sources}
    linears = {s for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) for s in packed[name].sources}
    cls, options = spec.handler.linear_cls, spec.linear_options()

    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(src):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                t = f.get_tensor(key)
                if module in quantized and leaf == "weight":
                    # One checkpoint tensor at a time, as one segment: its own NVFP4 global scale.
                    q = cls.from_float(t, None, (t.shape[0],), t.dtype, options).checkpoint_tensors()
                    tensors.update({f"{module}.{k}": v.contiguous() for k, v in q.items()})
                else:
                    tensors[key] = t
    config = {
        "producer": {"name": "parity.harness.quantize", "torch": torch.__version__},
        "quantization": {"quant_algo": algo, **({"group_size": 16} if algo == "NVFP4" else {}),
                         "exclude_modules": sorted(linears - quantized)},
    }
    return tensors, config


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)
