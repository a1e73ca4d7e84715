"""Quantization sensitivity probe: the denoisers of a pipeline built once, every candidate linear held in both its
float and its quantized form, so that any subset of linears is quantized by swapping modules in place (no reload,
no re-quantization), plus what one float forward says about each linear (its input activations, its own error).

The quantized modules are the ones `quantize_` builds for the spec (same selection, same packing, NVFP4 segments
from the checkpoint key map), so a configuration computes what a model loaded with the matching
--quant-ignored-layers computes; `quantized_by(patterns)` answers which linears such a model quantizes, through the
same pattern resolution a run uses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from engine.loading import load_model, read_config
from engine.quant.api import HANDLERS, QuantSpec, quantize_, select_linears
from engine.quant.linear import QuantLinear
from engine.quant.names import Packed, checkpoint_shapes, packed_from_key_map, pattern_matches, set_submodule

Key = tuple[str, str]  # (denoiser, engine module name)


@dataclass(frozen=True)
class Layer:
    denoiser: str
    name: str  # engine module name
    sources: tuple[str, ...]  # the checkpoint (diffusers) modules it is built from, as --quant-ignored-layers takes them
    float_bytes: int  # weight + bias in the compute dtype
    quant_bytes: int  # packed weight, scales, bias

    @property
    def key(self) -> Key:
        return self.denoiser, self.name


class _Captured(Exception):
    """Raised by call_from's pre-hook once the call's arguments are kept: the forward itself is not needed."""


@dataclass
class Call:
    """One captured denoiser call."""
    args: tuple
    kwargs: dict


def _detached_copy(x):
    """A captured call argument, copied so later steps cannot change it: tensors, and lists/tuples of them (the
    per-sample inputs of variable-length denoisers)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached_copy(v) for v in x)
    return x


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Probe:
    def __init__(self, family, denoisers: Mapping[str, nn.Module], packed: Mapping[str, Mapping[str, Packed]],
                 spec: QuantSpec, runner=None):
        if spec.handler is None:
            raise ValueError(f"a sensitivity probe needs a quant mode, not {spec.mode!r}")
        self.family, self.spec, self.models, self.packed, self.runner = family, spec, dict(denoisers), dict(packed), runner
        self.float: dict[Key, nn.Linear] = {}
        self.quant: dict[Key, QuantLinear] = {}
        for d, model in self.models.items():
            chosen = select_linears(model, spec, self.packed[d])
            quantize_(model, spec, packed_modules=self.packed[d])  # the walk a run uses, then read its modules back
            for name, linear in chosen.items():
                self.float[d, name], self.quant[d, name] = linear, model.get_submodule(name)
        self.layers = [Layer(d, n, self.packed[d][n].sources if n in self.packed[d] else (n,),
                             _nbytes(self.float[d, n].parameters()), self.quant[d, n].weight_bytes())
                       for d, n in self.float]
        self._current: frozenset[Key] = frozenset(self.float)
        self.set_quantized(())

    # --- configurations -------------------------------------------------------------------------------------------
    def set_quantized(self, keys: Iterable[Key]) -> None:
        """Quantize exactly these linears, every other candidate back to its float module."""
        keys = frozenset(keys)
        if unknown := keys - set(self.float):
            raise ValueError(f"not quantizable linears of this probe: {sorted(unknown)[:5]}")
        for key in keys ^ self._current:
            d, name = key
            set_submodule(self.models[d], name, self.quant[key] if key in keys else self.float[key])
        self._current = keys

    def quantized_by(self, ignored: Iterable[str]) -> frozenset[Key]:
        """The linears a run with --quant-ignored-layers `ignored` quantizes (every denoiser; a pattern must match in
        at least one of them)."""
        ignored = tuple(ignored)
        current = self._current
        self.set_quantized(())
        try:
            out, hit = set(), set()
            for d, model in self.models.items():
                aliases = [(n, *p.sources) for n, p in self.packed[d].items()]
                here = tuple(p for p in ignored if any(pattern_matches(p, a) for names in aliases for a in names))
                hit.update(here)
                out |= {(d, n) for n in select_linears(model, replace(self.spec, ignored=here), self.packed[d])}
            if missing := [p for p in ignored if p not in hit]:
                raise ValueError(f"--quant-ignored-layers patterns {missing} match no linear module")
            return frozenset(out)
        finally:
            self.set_quantized(current)

    def weight_bytes(self) -> int:
        """Every parameter and buffer of every denoiser, as currently configured."""
        return sum(_nbytes([*m.parameters(), *m.buffers()]) for m in self.models.values())

    # --- forwards -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, denoiser: str, call: Call) -> torch.Tensor:
        out = self.models[denoiser](*call.args, **call.kwargs)
        # Denoisers that take and return per-sample lists (variable-length samples) are compared stacked.
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    @torch.no_grad()
    def capture(self, cfg) -> dict[str, Call]:
        """Run the loaded pipeline once on `cfg` (float denoisers) and keep each denoiser's first call."""
        if self.runner is None:
            raise ValueError("this probe was built from synthesized weights; it has no pipeline to capture inputs from")
        self.set_quantized(())
        calls: dict[str, Call] = {}
        handles = []
        for d, model in self.models.items():
            def hook(module, args, kwargs, d=d):
                if d not in calls:
                    keep = _detached_copy
                    calls[d] = Call(tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()})
            handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            self.runner.generate(cfg)
        finally:
            for h in handles:
                h.remove()
        if missing := set(self.models) - set(calls):
            raise RuntimeError(f"the pipeline never called denoiser(s) {sorted(missing)}")
        return calls

    @torch.no_grad()
    def layer_stats(self, denoiser: str, call: Call) -> dict[str, dict[str, float]]:
        """One float forward; for every candidate linear of `denoiser`: its input's amax, RMS and per-channel RMS
        (max and median over channels), and its own output error when only its inputs' quantization and its weight
        change: the energy of the float output and of the quantized module's difference on the same input."""
        self.set_quantized(())
        stats: dict[str, dict[str, float]] = {}
        handles = []
        for (d, name), linear in self.float.items():
            if d != denoiser:
                continue

            def hook(module, args, output, name=name, quant=self.quant[d, name]):
                x = args[0].reshape(-1, module.in_features).float()
                channel_rms = x.pow(2).mean(dim=0).sqrt()
                error = quant(args[0]).float() - output.float()
                s = stats.setdefault(name, {"act_amax": 0.0, "act_sq": 0.0, "act_n": 0, "channel_rms_max": 0.0,
                                            "channel_rms_median": 0.0, "out_energy": 0.0, "out_error_energy": 0.0})
                s["act_amax"] = max(s["act_amax"], float(x.abs().amax()))
                s["act_sq"] += float(x.double().pow(2).sum())
                s["act_n"] += x.numel()
                s["channel_rms_max"] = max(s["channel_rms_max"], float(channel_rms.amax()))
                s["channel_rms_median"] = max(s["channel_rms_median"], float(channel_rms.median()))
                s["out_energy"] += float(output.double().pow(2).sum())
                s["out_error_energy"] += float(error.double().pow(2).sum())
            handles.append(linear.register_forward_hook(hook))
        try:
            self.forward(denoiser, call)
        finally:
            for h in handles:
                h.remove()
        return stats

    def call_from(self, denoiser: str, inputs: Mapping[str, torch.Tensor]) -> Call:
        """A call of `denoiser` from diffusers-named step-0 inputs, moved to the denoiser's device."""
        model = self.models[denoiser]
        device = next(model.parameters()).device
        captured: list[Call] = []

        def stop_at_entry(module, args, kwargs):
            captured.append(Call(args, kwargs))
            raise _Captured

        handle = model.register_forward_pre_hook(stop_at_entry, with_kwargs=True)
        try:  # the family maps diffusers names onto the model's arguments; the hook keeps them and stops the call
            self.family.denoiser_forward(model, {k: v.to(device) for k, v in inputs.items() if v is not None})
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the {self.family.name} denoiser_forward hook never called {denoiser}")
        return captured[0]

    def weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 weight as loaded, float32 dequantized weight) of one candidate linear."""
        return self.float[key].weight.detach().float(), self.quant[key].dequantize_weight()


def open_probe(cfg, family, open_runner: Callable, synthesize: Callable[[str], tuple[dict, Mapping[str, torch.Tensor]]]
               | None = None) -> Probe:
    """A probe over every denoiser of cfg.family's pipeline for quant mode cfg.quant: the pipeline loaded from
    cfg.model_dir unquantized (so it can capture step-0 inputs), or, given `synthesize(denoiser) -> (diffusers
    config, state dict)`, the denoisers alone built from those tensors on cfg.device."""
    spec = QuantSpec(cfg.quant)  # family and open_runner come from engine.api, above engine.quant
    if spec.handler is None:
        raise ValueError(f"sensitivity needs a quant mode, not {cfg.quant!r}; valid: {sorted(HANDLERS)}")
    models, packed = {}, {}
    if synthesize is None:
        runner = open_runner(cfg.replace(quant="none", quant_ignored=(), parallel="sp1"))
        for d in family.denoisers:
            component = Path(cfg.model_dir) / d
            _, key_map = family.denoiser_builder(d, read_config(component))
            models[d], packed[d] = getattr(runner, d), packed_from_key_map(key_map, checkpoint_shapes(component))
        return Probe(family, models, packed, spec, runner)
    for d in family.denoisers:
        config, state = synthesize(d)
        build, key_map = family.denoiser_builder(d, config)
        models[d] = load_model(build, key_map, state, cfg.torch_dtype, cfg.device)
        packed[d] = packed_from_key_map(key_map, {k: list(v.shape) for k, v in state.items()})
        del state
    return Probe(family, models, packed, spec)
