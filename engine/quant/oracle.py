"""What an outside oracle needs to check every quantized linear of a run: for each denoiser built as the run builds
it, the inventory of its linears (quantized or not, and the checkpoint modules each is made of), and for each
quantized one a few real input rows captured during one forward, the module's own output on them, and the raw
checkpoint data an independent implementation of the same scheme starts from (the unquantized source weights, the
bias, a calibrated static input scale if the loaded checkpoint carries one).

Nothing here judges: the harness recomputes each output with another library (harness/quant_oracle.py) and compares.
The source data is read from the checkpoint files, never from the quantized module, so a loader that drops or
mangles a tensor cannot hide it from the oracle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from torch import nn

from engine.family import Family
from engine.loading import safetensors_files
from engine.quant.api import QuantSpec
from engine.quant.linear import QuantLinear
from engine.quant.names import checkpoint_shapes, packed_from_key_map


@dataclass
class LinearRecord:
    denoiser: str
    layer: str  # engine module name
    sources: tuple[str, ...]  # checkpoint (diffusers) module names it is built from
    kind: str  # class of the module as built: Linear, Fp8Linear, NVFP4Linear, MXFP4Linear
    quantized: bool
    x: torch.Tensor | None = None  # [tokens, in_features] captured input rows, compute dtype (quantized only)
    y: torch.Tensor | None = None  # the module's output on x
    source_weights: tuple[torch.Tensor, ...] = ()  # unquantized checkpoint weights of `sources`, stored dtype
    bias: torch.Tensor | None = None  # unquantized checkpoint bias (sources concatenated), stored dtype
    input_scale: torch.Tensor | None = None  # static input scale of the loaded checkpoint (max over sources)


def _rows(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """A few rows of a captured input: evenly spaced ones plus the row holding the largest |value| (outliers are
    where scale rules differ), in their original order."""
    flat = x.detach().reshape(-1, x.shape[-1])
    n = flat.shape[0]
    picks = set(torch.linspace(0, n - 1, steps=min(tokens, n)).round().long().tolist())
    picks.add(int(flat.abs().amax(dim=-1).argmax()))
    return flat[sorted(picks)].clone()


@torch.no_grad()
def probe_linears(family: Family, model_dir: Path, source_dir: Path, spec: QuantSpec, dtype: torch.dtype, device,
                  inputs: Mapping[str, torch.Tensor], tokens: int = 8) -> Iterator[LinearRecord]:
    """One LinearRecord per nn.Linear or quantized linear of every denoiser of `family`, loaded from `model_dir` as a
    run loads it. Quantized layers get `tokens` (+1) input rows captured from one forward on the diffusers-named
    `inputs` (every denoiser is called on them), their output on those rows, and the source data from the
    unquantized `source_dir` and the loaded folder's own input_scale tensors. One denoiser in memory at a time."""
    from engine.denoisers import load_denoiser  # engine.denoisers imports the quant api: keep this module light

    for name in family.denoisers:
        component, source = Path(model_dir) / name, Path(source_dir) / name
        model, key_map = load_denoiser(family, name, component, spec, dtype, device)
        packed = packed_from_key_map(key_map, checkpoint_shapes(source))
        modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
        captured: dict[str, torch.Tensor] = {}

        def keep(module, args, name):  # returns None: a pre-hook's return value would replace the input
            if name not in captured:
                captured[name] = _rows(args[0], tokens)

        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: keep(mod, args, n))
                 for n, m in modules.items() if isinstance(m, QuantLinear)]
        try:
            family.denoiser_forward(model, {k: v.to(device) for k, v in inputs.items() if v is not None})
        finally:
            for h in hooks:
                h.remove()
        source_ckpt, loaded_ckpt = _LazyCheckpoint(source), _LazyCheckpoint(component)
        for layer, module in modules.items():
            sources = packed[layer].sources if layer in packed else (layer,)
            record = LinearRecord(name, layer, sources, type(module).__name__, isinstance(module, QuantLinear))
            if record.quantized:
                if layer not in captured:
                    raise RuntimeError(f"{name}.{layer} is quantized but the forward never called it")
                record.x = captured[layer]
                record.y = module(record.x)
                record.source_weights = tuple(source_ckpt[f"{s}.weight"] for s in sources)
                biases = [source_ckpt.get(f"{s}.bias") for s in sources]
                record.bias = None if any(b is None for b in biases) else torch.cat(biases)
                scales = [loaded_ckpt[f"{s}.input_scale"].float().reshape(()) for s in sources
                          if f"{s}.input_scale" in loaded_ckpt]
                record.input_scale = torch.stack(scales).amax() if scales else None
            yield record
        del model


class _LazyCheckpoint:
    """A folder's safetensors tensors read one at a time on demand: the oracle needs a few per layer, and a
    full-size checkpoint must never be held whole in memory beside the loaded model."""

    def __init__(self, component_dir: Path):
        self._where: dict[str, Path] = {}
        for file in safetensors_files(component_dir):
            with safe_open(str(file), framework="pt") as f:
                self._where.update(dict.fromkeys(f.keys(), file))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def get(self, key: str) -> torch.Tensor | None:
        return self[key] if key in self else None
