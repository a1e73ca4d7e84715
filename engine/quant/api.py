"""Quantization is applied to a built model, never written into model files.

  QuantSpec         the frozen config (mode + --quant-ignored-layers patterns + a few switches)
  HANDLERS          mode -> how to build that mode's linear (a plain dict)
  quantize_         one walk over a built model replacing nn.Linear modules (DiTs and transformers encoders alike)
  build_transformer load a DiT from a diffusers-format folder, plain or pre-quantized, as the spec says

Which linears are quantized by default: those inside a numbered block (a name segment that is an integer, i.e. a
ModuleList entry: a DiT's double_blocks.N / single_blocks.N, T5's block.N, CLIP's layers.N), adaLN modulation
linears included. Everything outside the blocks stays in the compute dtype: input embedders (x_embedder,
context_embedder), the time/guidance/text embedders and the final layer (norm_out, proj_out). That follows ModelOpt's
diffusion recipes, which leave those out because they are small and sit where errors reach the output unfiltered.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from engine.loading import CheckpointError, KeyMap, load_model, read_checkpoint
from engine.quant import prequantized
from engine.quant.linear import (
    BLOCK_SIZES, Fp8Backend, Fp8Linear, LinearOptions, MXFP4Linear, NVFP4Linear, QuantLinear,
)
from engine.quant.names import (  # noqa: F401  (re-exported: the harness imports names from api)
    Packed, checkpoint_shapes, in_block, packed_from_key_map, pattern_matches, resolve_ignored, set_submodule,
)


@dataclass(frozen=True)
class Handler:
    linear_cls: type[QuantLinear]
    act: bool  # weights + activations, or weights only
    checkpoint_format: str | None  # the pre-quantized folder format this mode loads; None: online only
    min_out_features: int = 0  # linears with fewer output features stay unquantized by default


HANDLERS: dict[str, Handler] = {
    "fp8": Handler(Fp8Linear, True, "fp8"),
    "fp8-wo": Handler(Fp8Linear, False, "fp8"),
    "nvfp4": Handler(NVFP4Linear, True, "nvfp4"),
    "nvfp4-wo": Handler(NVFP4Linear, False, "nvfp4"),
    # Narrow outputs gain little memory and MX's 32-wide, power-of-two scales hurt them most.
    "mxfp4": Handler(MXFP4Linear, True, None, min_out_features=256),
    "mxfp4-wo": Handler(MXFP4Linear, False, None, min_out_features=256),
}
MODES = ("none", *HANDLERS)
FP8_BACKENDS = {"auto": None, "scaled_mm": Fp8Backend.SCALED_MM, "emulated": Fp8Backend.EMULATED}


@dataclass(frozen=True)
class QuantSpec:
    mode: str = "none"
    ignored: tuple[str, ...] = ()  # --quant-ignored-layers patterns, matched on module-name dot boundaries
    min_out_features: int | None = None  # None: the mode's default (mxfp4 256, others 0)
    fp8_backend: str = "auto"  # auto | scaled_mm | emulated
    cache_dequant: bool = False
    swap_nibbles: bool = False  # NVFP4 folders that store element 2i in the high nibble

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown quant mode {self.mode!r}; valid: {list(MODES)}")
        if self.fp8_backend not in FP8_BACKENDS:
            raise ValueError(f"unknown fp8 backend {self.fp8_backend!r}; valid: {list(FP8_BACKENDS)}")
        object.__setattr__(self, "ignored", tuple(self.ignored))

    @property
    def handler(self) -> Handler | None:
        return HANDLERS.get(self.mode)

    def linear_options(self) -> LinearOptions:
        return LinearOptions(act=self.handler.act, fp8_backend=FP8_BACKENDS[self.fp8_backend],
                             cache_dequant=self.cache_dequant, swap_nibbles=self.swap_nibbles)


def select_linears(model: nn.Module, spec: QuantSpec, packed: Mapping[str, Packed] | None = None,
                   filter_fn: Callable[[str, nn.Module], bool] | None = None) -> dict[str, nn.Linear]:
    """The nn.Linear modules `spec` quantizes in `model`, by engine name."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ignored = resolve_ignored(spec.ignored, linears, packed)
    handler = spec.handler
    if handler is None:
        return {}
    keep = filter_fn or in_block
    min_out = handler.min_out_features if spec.min_out_features is None else spec.min_out_features
    chosen = {n: m for n, m in linears.items()
              if n not in ignored and keep(n, m) and m.out_features >= min_out}
    block = BLOCK_SIZES[handler.linear_cls]
    misfit = sorted(n for n, m in chosen.items() if m.in_features % block)
    if misfit:
        raise ValueError(f"{spec.mode} needs in_features divisible by {block}; these linears are not: {misfit[:5]}. "
                         "Add them to the ignored layers.")
    return chosen


# --- the walk -------------------------------------------------------------------------------------------------------
def quantize_(model: nn.Module, spec: QuantSpec, *, packed_modules: Mapping[str, Packed] | None = None,
              filter_fn: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Replace the selected nn.Linear modules of a built model in place and return it. `packed_modules` names the
    checkpoint modules behind each engine linear: patterns may use those names, and NVFP4 gives each stacked
    segment its own global scale. Without it every linear is one segment. Ignored patterns are checked even for
    mode "none", so a typo never passes silently."""
    chosen = select_linears(model, spec, packed_modules, filter_fn)
    if not chosen:
        return model
    options, cls = spec.linear_options(), spec.handler.linear_cls
    for name, linear in chosen.items():
        packed = (packed_modules or {}).get(name)
        rows = packed.rows if packed and packed.rows else (linear.out_features,)
        bias = None if linear.bias is None else linear.bias.detach()
        set_submodule(model, name, cls.from_float(linear.weight.detach(), bias, rows, linear.weight.dtype, options))
    return model


def quantize_model(model: nn.Module, spec: QuantSpec, key_map: KeyMap,
                   shapes: Mapping[str, Sequence[int]] | None = None) -> nn.Module:
    """quantize_ with the packed mapping derived from a family key map. Pass the checkpoint's tensor `shapes` to
    give each fused segment its own NVFP4 global scale (as build_transformer does); without them a fused module
    shares one, which changes NVFP4 weights slightly (fine for speed benchmarks, not for accuracy)."""
    return quantize_(model, spec, packed_modules=packed_from_key_map(key_map, shapes))


def build_transformer(build: Callable[[], nn.Module], key_map: KeyMap, component_dir: Path, spec: QuantSpec,
                      dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """Load a DiT from `component_dir` as `spec` says: a plain folder is loaded and then quantized online; a
    pre-quantized folder (see prequantized.folder_format) is assembled from its packed tensors directly."""
    component_dir = Path(component_dir)
    fmt, config = prequantized.folder_format(component_dir)
    if fmt is None:
        model = load_model(build, key_map, read_checkpoint(component_dir), dtype, device)
        return quantize_(model, spec, packed_modules=packed_from_key_map(key_map, checkpoint_shapes(component_dir)))
    handler = spec.handler
    if handler is None or handler.checkpoint_format != fmt:
        fits = [m for m, h in HANDLERS.items() if h.checkpoint_format == fmt]
        raise CheckpointError(f"{component_dir} holds a pre-quantized {fmt} checkpoint but the quant mode is "
                              f"{spec.mode!r}; modes that load it: {fits}")
    return prequantized.load(build, key_map, component_dir, spec, config, dtype, device)


# --- what the harness reads back ------------------------------------------------------------------------------------
def quant_summary(model: nn.Module) -> dict:
    """weight_bytes: every parameter and buffer; quantized_param_fraction: quantized weight elements over all
    linear weight and bias elements (biases are never quantized); n_quantized_linears."""
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    total = quantized = n_quant = n_linear = 0
    for module in model.modules():
        if isinstance(module, (QuantLinear, nn.Linear)):
            n_linear += 1
            elements = module.in_features * module.out_features
            total += elements + (0 if module.bias is None else module.bias.numel())
            if isinstance(module, QuantLinear):
                n_quant += 1
                quantized += elements
    scaled_mm = sum(getattr(m, "backend", None) is Fp8Backend.SCALED_MM and m.options.act for m in model.modules())
    return {"weight_bytes": weight_bytes, "quantized_param_fraction": quantized / total if total else 0.0,
            "n_quantized_linears": n_quant, "n_linears": n_linear, "n_fp8_scaled_mm_linears": scaled_mm}


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Engine module name -> float32 dequantized weight, for every quantized linear (compare against the
    checkpoint remapped with the family's key map, e.g. loading.remap(read_checkpoint(dir), key_map))."""
    return {n: m.dequantize_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
