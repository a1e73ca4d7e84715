"""Pre-quantized non-denoiser components (a transformers text encoder a release ships in FP8 too): write one in a
checkpoint format, and load it back with its quantized linears in the engine's own linear class.

A family declares such a component as an engine.family.QuantizedComponent (its folder, its transformers class, which
linears the release quantizes, in which formats). The component stays the library's module; only the declared linears
change. The checkpoint keeps the library's key names: each quantized module's `weight` is replaced by the format's
tensors (fp8-wo: e4m3 `weight` [N, K] and fp32 `weight_scale` [N], the public FP8 release layout), everything else is
kept bit for bit, and hf_quant_config.json names the algorithm and lists the linears left in high precision.

Loading builds the module on the meta device from its config (no full-precision copy of the quantized weights is
ever made), swaps in the quantized linears from their packed tensors, assigns the remaining tensors, then has the
library recompute its non-persistent buffers (rotary inv_freq), as its own from_pretrained does. A plain folder is
loaded by the library's from_pretrained, unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine.loading import CheckpointError, read_checkpoint
from engine.quant import prequantized
from engine.quant.api import HANDLERS, QuantSpec
from engine.quant.export import FORMATS, quantized_tensors, release_config
from engine.quant.names import set_submodule

WEIGHTS_NAME = "model.safetensors"  # transformers' single-file name


def model_class(component) -> type:
    """The component's transformers class, imported now: the family registry names it without importing it."""
    import transformers

    try:
        return getattr(transformers, component.model_class)
    except AttributeError:
        raise ValueError(f"component {component.folder!r}: transformers {transformers.__version__} has no class "
                         f"{component.model_class!r}") from None


def meta_build(component, folder: Path) -> nn.Module:
    """The component's module from the config in `folder`, on the meta device (no memory, no init)."""
    cls = model_class(component)
    config = cls.config_class.from_pretrained(folder)
    with torch.device("meta"):
        return cls._from_config(config)


def selected_linears(component, model: nn.Module) -> list[str]:
    """The linear modules the release quantizes, by name; none is an error (a selector that names nothing)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and component.select(n)]
    if not names:
        raise ValueError(f"component {component.folder!r}: the family's selector names no linear module of "
                         f"{type(model).__name__}")
    return names


def quantize_component(component, folder: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, hf_quant_config) of the quantized copy of the component in `folder`: each selected linear's weight
    quantized by the same linear class the engine's online path uses (per-row fp8 for fp8-wo), one tensor at a time."""
    if fmt not in component.formats:
        raise ValueError(f"component {component.folder!r} is stored in {list(component.formats)}, not {fmt!r}")
    algo, mode = FORMATS[fmt]
    model = meta_build(component, folder)
    chosen = set(selected_linears(component, model))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors = quantized_tensors(folder, chosen, QuantSpec(mode))
    if missing := sorted(m for m in chosen if f"{m}.weight_scale" not in tensors):
        raise CheckpointError(f"{folder}: no checkpoint weight for {missing[:5]} (key names differ from "
                              f"{component.model_class}'s)")
    return tensors, release_config(algo, linears - chosen)


def load_component(component, folder: Path, spec: QuantSpec, dtype: torch.dtype, device) -> nn.Module:
    """The component of `folder` on `device` in `dtype`: from_pretrained for a plain folder; for a pre-quantized one
    (prequantized.folder_format), every module with a `weight_scale` becomes the quant mode's linear, built from its
    packed tensors. The run's quant mode must be one that loads the folder's format. `spec.ignored` names denoiser
    layers and does not apply here."""
    folder = Path(folder)
    fmt, config = prequantized.folder_format(folder)
    if fmt is None:
        return model_class(component).from_pretrained(folder, dtype=dtype).to(device).eval()
    handler = spec.handler
    if handler is None or handler.checkpoint_format != fmt:
        fits = [m for m, h in HANDLERS.items() if h.checkpoint_format == fmt]
        raise CheckpointError(f"{folder} holds a pre-quantized {fmt} checkpoint but the quant mode is "
                              f"{spec.mode!r}; modes that load it: {fits}")
    model = meta_build(component, folder)
    if keep := sorted(set(model._keep_in_fp32_modules or ()) | set(model._keep_in_fp32_modules_strict or ())):
        # from_pretrained would load these in float32 while every other tensor is cast to `dtype`: not reproduced here.
        raise CheckpointError(f"{type(model).__name__} keeps {keep} in float32 when loaded; the pre-quantized "
                              "component loader casts every tensor to the run's dtype and cannot load it as the "
                              "library would")
    ckpt = read_checkpoint(folder, device)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    excluded = set(config.get("exclude_modules") or ())
    cls, options = handler.linear_cls, spec.linear_options()
    used: set[str] = set()
    swapped: list[str] = []
    for name in sorted(k.removesuffix(".weight_scale") for k in ckpt if k.endswith(".weight_scale")):
        if name not in linears:
            raise CheckpointError(f"{folder}: {name}.weight_scale names no linear module of {type(model).__name__}")
        if name in excluded:
            raise CheckpointError(f"{folder}: {name} is quantized but listed in exclude_modules")
        part = {k: ckpt[f"{name}.{k}"] for k in cls.CHECKPOINT_KEYS + cls.OPTIONAL_KEYS if f"{name}.{k}" in ckpt}
        if missing := [k for k in cls.CHECKPOINT_KEYS if k not in part]:
            raise CheckpointError(f"{folder}: {name} lacks {missing} for {cls.__name__}")
        bias = ckpt.get(f"{name}.bias")
        if (bias is None) != (linears[name].bias is None):
            raise CheckpointError(f"{folder}: {name}.bias is {'missing' if bias is None else 'unexpected'}")
        used |= {f"{name}.{k}" for k in part} | ({f"{name}.bias"} if bias is not None else set())
        try:
            module = quantized_linear(cls, part, bias, dtype, options)
        except ValueError as e:
            raise CheckpointError(f"{folder}: {name}: {e}") from None
        set_submodule(model, name, module)
        swapped.append(name)
    state = {}
    for key in model.state_dict():
        if key.rpartition(".")[0] in swapped:
            continue
        if key not in ckpt:
            raise CheckpointError(f"{folder}: missing {key}")
        if ckpt[key].element_size() == 1 and ckpt[key].is_floating_point():  # codes read as values: off by the scale
            raise CheckpointError(f"{folder}: {key} is {ckpt[key].dtype} but has no weight_scale beside it")
        state[key] = ckpt[key].to(dtype) if ckpt[key].is_floating_point() else ckpt[key]
        used.add(key)
    if unused := sorted(set(ckpt) - used):
        raise CheckpointError(f"{folder}: {len(unused)} unexpected keys {unused[:5]}")
    model.load_state_dict(state, assign=True, strict=False)
    _rebuild_non_persistent_buffers(model, device)
    if on_meta := [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]:
        raise CheckpointError(f"{folder}: not loaded: {on_meta[:5]}")
    return model.eval().requires_grad_(False)


def quantized_linear(cls, part: dict[str, torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype, options
                     ) -> nn.Module:
    """One component linear from its checkpoint tensors (one source module: components have no fused linears)."""
    return cls.from_checkpoint([part], bias, dtype, options)


def _rebuild_non_persistent_buffers(model: nn.Module, device) -> None:
    """Buffers no checkpoint holds (rotary inv_freq) are computed by the library's own initializer, the one its
    from_pretrained runs on them. Only parameter-free modules are re-initialized, so no loaded weight is touched."""
    for name, module in model.named_modules():
        stale = [b for b in module._non_persistent_buffers_set if getattr(module, b) is not None
                 and getattr(module, b).is_meta]
        if not stale:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise CheckpointError(f"cannot rebuild the non-persistent buffers {stale} of {name!r}: the module also "
                                  "holds parameters its initializer would overwrite")
        for b in stale:
            module.register_buffer(b, torch.empty_like(getattr(module, b), device=device), persistent=False)
        model._init_weights(module)
