"""Write a pre-quantized copy of a diffusers model folder that the engine loads directly.

Every component except the denoisers (the family's denoiser folders, e.g. transformer/) and the components the
family's release also stores in this format (engine.family.QuantizedComponent, e.g. a text encoder shipped in
fp8-wo) is hard-linked (copied where links cannot be made) unchanged. Such a component folder gets one
model.safetensors with the library's key names, its declared linears replaced by the format's tensors, and its own
hf_quant_config.json (engine/quant/component.py); --keep-bf16 patterns name denoiser layers only. Each denoiser
folder gets one safetensors file in the ModelOpt layout with diffusers key names: each quantized module's `weight` is
replaced by the format's tensors (NVFP4: uint8 weight [N, K/2], e4m3 weight_scale [N, K/16], fp32 weight_scale_2;
fp8-wo: e4m3 weight [N, K], fp32 weight_scale [N]), everything else is kept bit for bit, and hf_quant_config.json
names the algorithm and lists every linear left in high precision in exclude_modules.

Which modules are quantized is decided by the engine's own walk and each checkpoint tensor is quantized by the same
function the engine's online path calls (engine.api.quantized_denoiser), so a folder written here dequantizes to
exactly the weights online quantization of the source folder gives (when the engine loads in the stored dtype:
online quantization starts from the weights cast to the compute dtype).

NVFP4 folders carry no input_scale unless calibrated (`--calibrate PROMPT...`: the prompts run once through the bf16
model and each quantized module gets input_scale = amax / (6 * 448) of the inputs it saw). Without one the engine
computes the activation global scale per call (see NVFP4Linear); runtimes that require a static input_scale cannot
run such folders in W4A4.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from safetensors.torch import save_file

from engine.api import QUANT_CONFIG_NAME as CONFIG_NAME
from engine.api import (calibrate_input_amax, checkpoint_formats, folder_denoisers, quantized_component,
                        quantized_components, quantized_denoiser)

# format -> (quant_algo written to hf_quant_config.json, engine quant mode whose walk and linear class are used)
FORMATS = checkpoint_formats()
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
COMPONENT_WEIGHTS_NAME = "model.safetensors"  # transformers' single-file name
# What quantize_folder writes, as a version: part of the name of the copies the sweep caches beside the zoo, so a
# copy written by an older layout is never reused. 2: the family's quantized components (text encoders) too.
LAYOUT_VERSION = 2


def quantize_folder(model_dir, fmt: str, out_dir, keep_bf16: tuple[str, ...] = (),
                    calibration=None) -> Path:
    """Write the quantized folder at `out_dir` (which must not exist or be empty) and return its path.

    keep_bf16: --quant-ignored-layers patterns (engine or diffusers names; a pattern naming part of a fused module
    keeps the whole fused module). A pattern that matches nothing raises ValueError. The folder is assembled in a
    temp dir next to `out_dir` and renamed into place, so nothing half-written is ever visible.

    calibration: an engine.api RunConfig of the bf16 folder whose prompts, steps and size are run once through the
    unquantized model; each quantized module then carries a static input_scale from the largest |input| it saw."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; valid: {sorted(FORMATS)}")
    model_dir, out_dir = Path(model_dir).absolute(), Path(out_dir).absolute()
    denoisers = folder_denoisers(model_dir)
    components = quantized_components(model_dir, fmt)
    for name in denoisers + components:
        if (model_dir / name / CONFIG_NAME).is_file():
            raise ValueError(f"{model_dir / name} is already quantized ({CONFIG_NAME} present)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")

    amax = calibrate_input_amax(calibration) if calibration is not None else {}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        for entry in model_dir.iterdir():
            if entry.name not in denoisers + components:
                _link_tree(entry, tmp / entry.name)
        for name in denoisers + components:  # one component's tensors in memory at a time
            if name in denoisers:
                tensors, quant_config = quantized_denoiser(model_dir, name, fmt, tuple(keep_bf16), amax.get(name))
            else:
                tensors, quant_config = quantized_component(model_dir, name, fmt)
            (tmp / name).mkdir()
            for entry in (model_dir / name).iterdir():  # config and anything else that is not the weights
                if not (entry.name.endswith(".safetensors") or entry.name.endswith(".safetensors.index.json")):
                    _link_tree(entry, tmp / name / entry.name)
            weights = WEIGHTS_NAME if name in denoisers else COMPONENT_WEIGHTS_NAME
            save_file(tensors, str(tmp / name / weights), metadata={"format": "pt"})
            (tmp / name / CONFIG_NAME).write_text(json.dumps(quant_config, indent=2) + "\n")
            del tensors
        os.replace(tmp, out_dir)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


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
