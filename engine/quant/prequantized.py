"""Pre-quantized transformer folders: recognise the format, then assemble the model from packed tensors without
ever holding a full-precision copy of the quantized weights.

Formats recognised:
  nvfp4  hf_quant_config.json {"quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": [...]}}
         and per quantized module `weight` uint8 [N, K/2], `weight_scale` e4m3 [N, K/16], `weight_scale_2` fp32,
         optionally `input_scale` fp32 (ModelOpt's export).
  fp8    quant_algo "FP8" or "FP8_PER_CHANNEL_PER_TOKEN", or no config at all with `weight` e4m3 next to an fp32
         `weight_scale` per row or per tensor (the layout of public fp8 weight-only releases).
The tensors decide which modules are quantized (a module is quantized iff its `weight_scale` is present);
exclude_modules is cross-checked against them. A fused engine module whose checkpoint parts are not all quantized,
or that the user ignores, is loaded in the compute dtype with its quantized parts dequantized.
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from engine.loading import CheckpointError, KeyMap, read_checkpoint, safetensors_files
from engine.quant.names import packed_from_key_map, resolve_ignored, set_submodule

CONFIG_NAME = "hf_quant_config.json"
QUANT_ALGOS = {"NVFP4": "nvfp4", "FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8"}


def folder_format(component_dir: Path) -> tuple[str | None, dict]:
    """(format, quantization config) of a transformer folder; (None, {}) for a plain one."""
    component_dir = Path(component_dir)
    path = component_dir / CONFIG_NAME
    if path.is_file():
        quant = json.loads(path.read_text()).get("quantization")
        if not isinstance(quant, dict) or quant.get("quant_algo") not in QUANT_ALGOS:
            raise CheckpointError(f"{path}: quantization.quant_algo must be one of {sorted(QUANT_ALGOS)}, "
                                  f"got {quant and quant.get('quant_algo')!r}")
        if quant["quant_algo"] == "NVFP4" and quant.get("group_size", 16) != 16:
            raise CheckpointError(f"{path}: NVFP4 group_size must be 16, got {quant['group_size']}")
        return QUANT_ALGOS[quant["quant_algo"]], quant
    for file in safetensors_files(component_dir):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if k.endswith(".weight_scale")):
                weight = key.removesuffix("_scale")
                dtype = f.get_slice(weight).get_dtype() if weight in keys else None
                if dtype != "F8_E4M3":
                    raise CheckpointError(f"{component_dir}: {key} is present but {weight} is {dtype}, and no "
                                          f"{CONFIG_NAME} says which format this is")
                return "fp8", {"quant_algo": "FP8", "exclude_modules": []}
    return None, {}


def load(build: Callable[[], nn.Module], key_map: KeyMap, component_dir: Path, spec, config: dict,
         dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """Build on meta, swap in the spec's quantized linear for every quantized checkpoint module, assign the rest."""
    with torch.device("meta"):
        model = build()
    if set(model.state_dict()) != set(key_map):
        raise CheckpointError("key map and model disagree: "
                              f"{sorted(set(model.state_dict()) ^ set(key_map))[:5]}")
    ckpt = read_checkpoint(component_dir, device)
    packed = packed_from_key_map(key_map, {k: v.shape for k, v in ckpt.items() if k in _weights(key_map)})
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ignored = resolve_ignored(spec.ignored, linears, packed)
    excluded = config.get("exclude_modules") or []
    cls, options = spec.handler.linear_cls, spec.linear_options()
    keys = cls.CHECKPOINT_KEYS + cls.OPTIONAL_KEYS
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    swapped: set[str] = set()
    for name in linears:
        sources = packed[name].sources
        quantized = [f"{s}.weight_scale" in ckpt for s in sources]
        for src, q in zip(sources, quantized):
            if q and any(fnmatch.fnmatchcase(src, e) for e in excluded):
                raise CheckpointError(f"{component_dir}: {src} is quantized but listed in exclude_modules")
        if not any(quantized):
            continue
        parts = [{k: ckpt[f"{s}.{k}"] for k in keys if f"{s}.{k}" in ckpt} if q else None
                 for s, q in zip(sources, quantized)]
        used |= {f"{s}.{k}" for s, part in zip(sources, parts) if part for k in part}
        if all(quantized) and name not in ignored:
            for src, part in zip(sources, parts):
                if missing := [k for k in cls.CHECKPOINT_KEYS if k not in part]:
                    raise CheckpointError(f"{component_dir}: {src} lacks {missing} for {cls.__name__}")
            bias = _cat(ckpt, key_map.get(f"{name}.bias"), used)
            try:
                module = cls.from_checkpoint(parts, bias, dtype, options)
            except ValueError as e:
                raise CheckpointError(f"{component_dir}: {name} ({', '.join(sources)}): {e}") from None
            set_submodule(model, name, module)
            swapped.add(name)
        else:
            weights = [cls.dequantize_part(part, options) if part else _unscaled(ckpt, f"{s}.weight").float()
                       for s, part in zip(sources, parts)]
            used |= {f"{s}.weight" for s, part in zip(sources, parts) if not part}
            state[f"{name}.weight"] = torch.cat(weights).to(dtype)
    for key, srcs in key_map.items():
        if key in state or key.rpartition(".")[0] in swapped:
            continue
        for src in srcs or ():
            if src in ckpt:
                _unscaled(ckpt, src)
        state[key] = _cat(ckpt, srcs, used).to(dtype)
    if unused := sorted(set(ckpt) - used):
        raise CheckpointError(f"{component_dir}: {len(unused)} unexpected keys {unused[:5]}")
    model.load_state_dict(state, assign=True, strict=False)
    if on_meta := [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]:
        raise CheckpointError(f"{component_dir}: not loaded: {on_meta[:5]}")
    return model.eval().requires_grad_(False)


def _unscaled(ckpt: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A tensor loaded as it is stored; an 8-bit float one has lost its weight_scale (its codes would be read as
    values, off by the scale), which is an error."""
    if key not in ckpt:
        raise CheckpointError(f"missing keys {[key]}")
    if ckpt[key].is_floating_point() and ckpt[key].element_size() == 1:
        raise CheckpointError(f"{key} is {ckpt[key].dtype} but has no weight_scale beside it")
    return ckpt[key]


def _weights(key_map: KeyMap) -> set[str]:
    return {s for k, srcs in key_map.items() if k.endswith(".weight") for s in srcs}


def _cat(ckpt: dict[str, torch.Tensor], srcs: tuple[str, ...] | None, used: set[str]) -> torch.Tensor | None:
    if srcs is None:
        return None
    if missing := [s for s in srcs if s not in ckpt]:
        raise CheckpointError(f"missing keys {missing[:5]}")
    used.update(srcs)
    return ckpt[srcs[0]] if len(srcs) == 1 else torch.cat([ckpt[s] for s in srcs])
