"""Quantize one denoiser checkpoint into the ModelOpt layout, tensor by tensor, with the engine's own walk.

Which modules are quantized is decided by select_linears on a meta-device build, and each checkpoint tensor is
quantized by the same linear class the engine's online path uses, so a folder written from these tensors
dequantizes to exactly the weights online quantization of the source folder gives (when the engine loads in the
stored dtype: online quantization starts from the weights cast to the compute dtype)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from torch import nn

from engine.loading import KeyMap, safetensors_files
from engine.quant.api import QuantSpec, checkpoint_shapes, packed_from_key_map, select_linears
from engine.quant.formats import nvfp4

# format -> (quant_algo written to hf_quant_config.json, engine quant mode whose walk and linear class are used)
FORMATS = {"nvfp4": ("NVFP4", "nvfp4"), "fp8-wo": ("FP8_PER_CHANNEL_PER_TOKEN", "fp8-wo")}
# format -> calibrated input amax -> the static `input_scale` its checkpoints carry (ModelOpt's meaning). A format
# without an entry quantizes weights only and takes no calibration.
INPUT_SCALE = {"nvfp4": nvfp4.global_scale}


def quantize_checkpoint(build: Callable[[], nn.Module], key_map: KeyMap, src: Path, fmt: str,
                        keep_bf16: tuple[str, ...], input_amax: Mapping[str, float] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, hf_quant_config) of the quantized copy of the denoiser checkpoint in `src`. `input_amax`
    (checkpoint module -> calibrated amax, engine.quant.calibrate) adds a static input_scale to every quantized
    module; a quantized module it lacks is an error (a partly calibrated checkpoint would mix static and dynamic)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; valid: {sorted(FORMATS)}")
    if input_amax is not None and fmt not in INPUT_SCALE:
        raise ValueError(f"format {fmt!r} quantizes weights only: it has no input scale to calibrate; "
                         f"calibration applies to {sorted(INPUT_SCALE)}")
    algo, mode = FORMATS[fmt]
    spec = QuantSpec(mode, ignored=keep_bf16)
    with torch.device("meta"):
        model = build()
    packed = packed_from_key_map(key_map, checkpoint_shapes(src))
    chosen = select_linears(model, spec, packed)
    quantized = {s for name in chosen for s in packed[name].sources}
    linears = {s for name, m in model.named_modules() if isinstance(m, nn.Linear) for s in packed[name].sources}

    def input_scale(module: str) -> dict[str, torch.Tensor]:
        if input_amax is None:
            return {}
        if module not in input_amax:
            raise ValueError(f"calibration recorded no input for {module}")
        amax = torch.tensor(input_amax[module], dtype=torch.float32)
        return {f"{module}.input_scale": INPUT_SCALE[fmt](amax).reshape(())}

    tensors = quantized_tensors(src, quantized, spec, input_scale)
    return tensors, release_config(algo, linears - quantized)


def quantized_tensors(src: Path, quantized: set[str], spec: QuantSpec,
                      extra: Callable[[str], dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors checkpoint in `src`, the weight of each module in `quantized` replaced by the
    checkpoint tensors of spec's linear class (plus extra(module), e.g. a calibrated input scale). One checkpoint
    tensor at a time, as one segment: its own NVFP4 global scale; nothing is dequantized or kept twice."""
    cls, options = spec.handler.linear_cls, spec.linear_options()
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(src):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                module, _, leaf = key.rpartition(".")
                t = f.get_tensor(key)
                if module in quantized and leaf == "weight":
                    q = cls.from_float(t, None, (t.shape[0],), t.dtype, options).checkpoint_tensors()
                    tensors.update({f"{module}.{k}": v.contiguous() for k, v in q.items()})
                    tensors.update(extra(module) if extra else {})
                else:
                    tensors[key] = t
    return tensors


def release_config(algo: str, excluded: set[str]) -> dict:
    """hf_quant_config.json of a quantized copy: the algorithm and the linears left unquantized."""
    return {
        "producer": {"name": "parity.harness.quantize", "torch": torch.__version__},
        "quantization": {"quant_algo": algo, **({"group_size": 16} if algo == "NVFP4" else {}),
                         "exclude_modules": sorted(excluded)},
    }
