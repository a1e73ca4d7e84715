"""Family-independent work on a family's denoisers: load (and quantize) one from its component folder, check a
quant spec against every denoiser before any work, and read back what quantization did to each weight.

A family appears here only as its engine.family.Family record; every loop goes over all of its denoisers."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from engine.family import DenoiserWeights, Family, KeyMap
from engine.loading import load_model, read_checkpoint, read_config, remap
from engine.quant.api import QuantSpec, build_transformer, quant_summary, quantize_model, select_linears
from engine.quant.component import load_component
from engine.quant.prequantized import folder_format
from engine.quant.linear import QuantLinear
from engine.quant.names import packed_from_key_map


def builder(family: Family, name: str, component_dir: Path):
    """(meta-buildable constructor, key map) of denoiser `name` as configured in its folder."""
    return family.denoiser_builder(name, read_config(component_dir))


def load_denoiser(family: Family, name: str, component_dir: Path, spec: QuantSpec, dtype: torch.dtype,
                  device) -> tuple[nn.Module, KeyMap]:
    """The (quantized) denoiser of a folder and its checkpoint key map."""
    build, key_map = builder(family, name, component_dir)
    return build_transformer(build, key_map, component_dir, spec, dtype, device), key_map


def load_denoiser_weights(family: Family, name: str, weights: DenoiserWeights, spec: QuantSpec, dtype: torch.dtype,
                          device) -> tuple[nn.Module, KeyMap]:
    """The (quantized) denoiser built from in-memory weights instead of a folder (a bench on synthesized weights); fused
    segments keep their own NVFP4 global scales, as a folder load gives them."""
    build, key_map = family.denoiser_builder(name, dict(weights.config))
    shapes = {k: tuple(v.shape) for k, v in weights.state_dict.items()}
    model = load_model(build, key_map, weights.state_dict, dtype, device)
    return quantize_model(model, spec, key_map, shapes), key_map


def check_quant_spec(family: Family, model_dir: Path, spec: QuantSpec) -> None:
    """Fail before any work if the spec cannot apply to a denoiser (an ignored-layer pattern that matches
    nothing, a layer shape the format cannot take): built on the meta device, so it costs no memory. The spec
    applies to every denoiser alike, so each pattern must match in each."""
    for name in family.denoisers:
        build, key_map = builder(family, name, Path(model_dir) / name)
        with torch.device("meta"):
            model = build()
        try:
            select_linears(model, spec, packed_from_key_map(key_map, None))
        except ValueError as e:
            raise ValueError(f"denoiser {name!r}: {e}" if len(family.denoisers) > 1 else str(e)) from None


def summary(family: Family, pipeline) -> dict:
    """quant_summary over every denoiser of a built pipeline and every component the family may load quantized
    (Family.quantized_components, quantized or not: weight_bytes of a quantized and an unquantized run then cover the
    same modules), summed (the fraction weighted by linear count)."""
    names = family.denoisers + tuple(c.folder for c in family.quantized_components)
    parts = [quant_summary(getattr(getattr(pipeline, n), "inner", getattr(pipeline, n))) for n in names]
    if len(parts) == 1:
        return parts[0]
    total = {k: sum(p[k] for p in parts) for k in parts[0] if k != "quantized_param_fraction"}
    weights = [p["n_linears"] for p in parts]
    total["quantized_param_fraction"] = (sum(p["quantized_param_fraction"] * w for p, w in zip(parts, weights))
                                         / max(sum(weights), 1))
    return total


def dequantized_weight_pairs(family: Family, model_dir: Path, source_dir: Path, spec: QuantSpec,
                             dtype: torch.dtype, device) -> Iterator[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(denoiser, layer, dequantized weight, the source checkpoint's weight) for every quantized linear of every
    denoiser, built as a run builds it (dtype, device) from `model_dir`, compared with the unquantized
    `source_dir`; then the same for every quantized component of the family (its folder name in the first place).
    One model in memory and one layer dequantized at a time: a full-size model never exists in fp32."""
    for name in family.denoisers:
        model, key_map = load_denoiser(family, name, Path(model_dir) / name, spec, dtype, device)
        reference = remap(read_checkpoint(Path(source_dir) / name), key_map)
        for layer, module in model.named_modules():
            if isinstance(module, QuantLinear):
                weight = module.dequantize_weight()
                yield name, layer, weight, reference[f"{layer}.weight"].to(device=weight.device, dtype=torch.float32)
        del model, reference
    for component in family.quantized_components:
        if folder_format(Path(model_dir) / component.folder)[0] is None:
            continue  # loaded as the library loads it: nothing quantized (online modes quantize denoisers only)
        model = load_component(component, Path(model_dir) / component.folder, spec, dtype, device)
        reference = read_checkpoint(Path(source_dir) / component.folder)
        for layer, module in model.named_modules():
            if isinstance(module, QuantLinear):
                weight = module.dequantize_weight()
                yield (component.folder, layer, weight,
                       reference[f"{layer}.weight"].to(device=weight.device, dtype=torch.float32))
        del model, reference
