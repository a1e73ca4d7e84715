"""Calibration of static activation scales: run a few prompts through the unquantized pipeline and record, for every
linear of every denoiser, the largest |input| it saw over every call (all steps, both CFG branches). A pre-quantized
checkpoint turns each amax into its format's static input scale (NVFP4: input_scale = amax / (6 * 448),
engine.quant.export), as ModelOpt's max calibration does.

Amax is recorded per checkpoint module: the parts of a fused engine linear (to_q, to_k, to_v) read the same input,
so they get the same amax, which is what a per-module export calibrated on the same data holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from engine.loading import read_config
from engine.quant.names import packed_from_key_map


@torch.no_grad()
def input_amax(cfg, family, open_runner: Callable) -> dict[str, dict[str, float]]:
    """denoiser -> checkpoint module name -> amax of its input over one generate(cfg) of the unquantized model
    (cfg.prompts are the calibration prompts; quant, ignored layers and parallel are ignored)."""
    runner = open_runner(cfg.replace(quant="none", quant_ignored=(), parallel="sp1"))
    amax: dict[str, dict[str, float]] = {d: {} for d in family.denoisers}
    hooks = []
    for d in family.denoisers:
        _, key_map = family.denoiser_builder(d, read_config(Path(cfg.model_dir) / d))
        packed = packed_from_key_map(key_map, None)
        model = getattr(runner, d)
        for name, module in getattr(model, "inner", model).named_modules():
            if not isinstance(module, nn.Linear):
                continue
            sources = packed[name].sources if name in packed else (name,)

            def hook(mod, args, d=d, sources=sources):  # returns None: the input passes unchanged
                value = float(args[0].detach().abs().amax())
                for s in sources:
                    amax[d][s] = max(amax[d].get(s, 0.0), value)
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        runner.generate(cfg)
    finally:
        for h in hooks:
            h.remove()
    if empty := [d for d, seen in amax.items() if not seen]:
        raise RuntimeError(f"calibration never called the linears of denoiser(s) {empty}")
    return amax
