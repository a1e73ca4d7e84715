"""Deterministic synthetic weights that are scaled like a trained network.

Every tensor is a pure function of (seed, name, shape, kind, gain): its own generator is seeded from
sha256(f"{seed}:{name}"), with name = "<component>/<state-dict key>" (e.g. "transformer/proj_out.weight") so that equal
keys in two components get different values. Adding, removing or reordering other tensors never changes a tensor, and
a full-size model can be synthesized tensor by tensor straight onto a GPU.

Why the scales matter: random weights with a default init either vanish or explode through a 57-block DiT, and
Gaussian weights without outliers make quantization look far better than on trained checkpoints (a per-row fp8 or a
16-element fp4 block scale is set by its largest element). So linear weights are N(0, 1/fan_in) with a few heavy input
columns and a few heavy output rows, norm weights sit near 1, biases are small, and the adaLN modulation linears carry
no outliers and a per-family gain so that shift/scale/gate stay O(0.1..1).

Device: on CPU (the default) the values are the reference values, bit-identical across runs. With a CUDA device the
draws use a CUDA generator for speed (a 12B-parameter DiT in ~12 s on an H100): the same seed then gives
DIFFERENT values than on CPU (still deterministic for a given GPU, torch version and seed), so never compare CPU-built
and CUDA-built weights with each other. CPU values do not depend on the thread count.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

# Kinds of tensors, each with its own rule in `synth_tensor`.
LINEAR = "linear"            # N(0, 1/fan_in) + outlier columns and rows
LINEAR_PLAIN = "linear_plain"  # N(0, 1/fan_in), no outliers: modulation and timestep/text embedders
CONV = "conv"                # N(0, 1/fan_in), fan_in = in_channels * kernel area
EMBEDDING = "embedding"      # N(0, 1): lookup tables feed pre-norm blocks, so their scale is free; 1 is simplest
NORM = "norm"                # 1 + N(0, NORM_NOISE^2)
BIAS = "bias"                # N(0, BIAS_STD^2)
OTHER = "other"              # a bare parameter of no known layer: N(0, 1)
KINDS = (LINEAR, LINEAR_PLAIN, CONV, EMBEDDING, NORM, BIAS, OTHER)

# Outliers: ~1% of input columns scaled 8-16x, ~0.5% of output rows 2-4x (at least one of each), then the whole
# matrix is scaled to an expected RMS of gain/sqrt(fan_in): outliers redistribute energy instead of adding gain per layer.
OUTLIER_COL_FRACTION, OUTLIER_COL_SCALE = 0.01, (8.0, 16.0)
OUTLIER_ROW_FRACTION, OUTLIER_ROW_SCALE = 0.005, (2.0, 4.0)
NORM_NOISE = 0.1
BIAS_STD = 0.02

# adaLN / embedder name patterns shared by the diffusers DiT families (substring match on the parameter name).
MODULATION_PATTERNS = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear")
EMBEDDER_PATTERNS = ("time_text_embed.", "timestep_embedder.", "guidance_embedder.", "text_embedder.")


@dataclass(frozen=True)
class ParamSpec:
    """One tensor to synthesize: its state-dict name, shape, kind (one of KINDS) and a gain on its std."""

    name: str
    shape: tuple[int, ...]
    kind: str
    gain: float = 1.0
    edits: tuple[tuple, ...] = ()  # (op, *args) applied after drawing, in order; ops in EDITS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown tensor kind {self.kind!r} for {self.name}; valid: {KINDS}")
        for op, *_ in self.edits:
            if op not in EDITS:
                raise ValueError(f"unknown tensor edit {op!r} for {self.name}; valid: {sorted(EDITS)}")


def name_seed(seed: int, name: str) -> int:
    """The 63-bit generator seed of one tensor: sha256 of "seed:name", so it depends on nothing else."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(name_seed(seed, name))
    return gen


def _uniform(n: int, lo_hi: tuple[float, float], gen, device) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _outlier_linear(shape: tuple[int, ...], gain: float, gen, device) -> torch.Tensor:
    out_f, in_f = shape
    w = torch.randn(out_f, in_f, generator=gen, device=device)
    col = torch.ones(in_f, device=device)
    n_col = max(1, round(in_f * OUTLIER_COL_FRACTION))
    col[torch.randperm(in_f, generator=gen, device=device)[:n_col]] = _uniform(n_col, OUTLIER_COL_SCALE, gen, device)
    row = torch.ones(out_f, device=device)
    n_row = max(1, round(out_f * OUTLIER_ROW_FRACTION))
    row[torch.randperm(out_f, generator=gen, device=device)[:n_row]] = _uniform(n_row, OUTLIER_ROW_SCALE, gen, device)
    # Normalize by the EXPECTED mean square, mean(row^2) * mean(col^2), summed in Python floats: a reduction over
    # the drawn matrix would depend on the thread count and could flip the last bit between machines.
    ms = math.fsum(x * x for x in row.tolist()) / out_f * math.fsum(x * x for x in col.tolist()) / in_f
    scale = gain / math.sqrt(in_f * ms)
    return w * (row * scale)[:, None] * col[None, :]


def synth_tensor(spec: ParamSpec, seed: int, namespace: str, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Draw one tensor. Drawn in float32 on `device`, then cast: the rounding to `dtype` is the only dtype effect."""
    device = torch.device(device)
    gen = _generator(seed, f"{namespace}/{spec.name}", device)
    shape = spec.shape
    if spec.kind == LINEAR:
        if len(shape) != 2:
            raise ValueError(f"{spec.name}: a linear weight must be 2-D, got shape {shape}")
        t = _outlier_linear(shape, spec.gain, gen, device)
    elif spec.kind in (LINEAR_PLAIN, CONV):
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=gen, device=device) * (spec.gain / math.sqrt(fan_in))
    elif spec.kind == NORM:
        t = 1.0 + NORM_NOISE * spec.gain * torch.randn(shape, generator=gen, device=device)
    elif spec.kind == BIAS:
        t = BIAS_STD * spec.gain * torch.randn(shape, generator=gen, device=device)
    else:  # EMBEDDING, OTHER
        t = spec.gain * torch.randn(shape, generator=gen, device=device)
    for op, *args in spec.edits:
        t = EDITS[op](t, *args)
    return t.to(dtype)


# --- planted hazards: data-level edits of single tensors, applied after drawing -------------------------------------
def _add_at(t: torch.Tensor, index: int, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] += value
    return t


def _zero_column(t: torch.Tensor, index: int) -> torch.Tensor:
    t = t.clone()
    t[:, index] = 0.0
    return t


EDITS = {"add_at": _add_at, "zero_column": _zero_column}


def plant_massive_activation(specs: list[ParamSpec], producer: str, consumer: str, channel: int, value: float,
                             offset: int = 0) -> list[ParamSpec]:
    """Give `consumer`'s input channel `offset + channel` a massive constant activation: `producer` gets `value` added
    to its bias element `channel`, and the consumer's weight column for that input is zeroed so the constant never
    reaches its output. The family names a producer whose output channel reaches that consumer input and nothing
    else, through operations that pass a large constant on unchanged (GELU: gelu(C + y) = C + y once C is large).

    Trained transformers carry such channels ("massive activations": a few input-independent values thousands of
    times the median, acting as biases); they are what makes per-token FP8 and NVFP4 activation scales fail on one
    layer while the rest of the model quantizes well. Unquantized, the planted model computes what the unplanted one
    computes with that one weight column zeroed."""
    by_name = {s.name: s for s in specs}
    for key in (f"{producer}.bias", f"{consumer}.weight"):
        if key not in by_name:
            raise ValueError(f"cannot plant a massive activation: no tensor {key!r}")
    width = by_name[f"{producer}.bias"].shape[0]
    if by_name[f"{consumer}.weight"].shape[1] < offset + width or not 0 <= channel < width:
        raise ValueError(f"channel {channel} is outside {producer}'s {width} outputs or {consumer}'s inputs")
    planted = {f"{producer}.bias": ("add_at", channel, float(value)),
               f"{consumer}.weight": ("zero_column", offset + channel)}
    return [replace(s, edits=s.edits + (planted[s.name],)) if s.name in planted else s for s in specs]


# Where the folder writers draw their tensors (harness.zoo.build's `draw_device`, set with `drawing_on`). It decides
# the values (see the module docstring), not where the tensors end up: synthesize() without a device hands them back on
# the CPU, ready to be written. A full-size model drawn on the CPU takes minutes (~75M values/s on two cores).
_DRAW_DEVICE: ContextVar[str] = ContextVar("draw_device", default="cpu")


@contextlib.contextmanager
def drawing_on(device):
    """Within the block, synthesize() calls that name no device draw on `device` ("cpu", "cuda", "cuda:N")."""
    token = _DRAW_DEVICE.set(str(torch.device(device)))
    try:
        yield
    finally:
        _DRAW_DEVICE.reset(token)


def synthesize(specs: list[ParamSpec], seed: int, namespace: str, device=None, dtype=torch.float32) -> dict:
    """A full state dict, one tensor per spec, in spec order. `device`: where the tensors are drawn and kept; None:
    drawn where `drawing_on` says (the CPU unless set) and returned on the CPU."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in specs")
    if device is not None:
        return {s.name: synth_tensor(s, seed, namespace, device, dtype) for s in specs}
    draw = _DRAW_DEVICE.get()
    return {s.name: synth_tensor(s, seed, namespace, draw, dtype).cpu() for s in specs}


def _kind(module: nn.Module, param_name: str, full_name: str) -> str:
    if param_name == "bias":
        return BIAS
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return CONV
    if isinstance(module, nn.Linear):
        plain = any(p in full_name for p in MODULATION_PATTERNS + EMBEDDER_PATTERNS)
        return LINEAR_PLAIN if plain else LINEAR
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    # Norm classes come from torch, diffusers and transformers (RMSNorm, T5LayerNorm, GroupNorm...): match by name.
    if "norm" in type(module).__name__.lower() and param_name == "weight":
        return NORM
    return OTHER


def specs_from_module(module: nn.Module, gain_fn=None) -> list[ParamSpec]:
    """Specs for every parameter of `module` (best built on the meta device), in state-dict order.

    Tied parameters appear once, under their first name (T5's shared.weight, not encoder.embed_tokens.weight), which
    is also how transformers writes them. Persistent buffers would need real values we cannot invent: they raise.
    `gain_fn(name, kind) -> float` lets a family adjust one tensor's std (e.g. T5's unscaled attention)."""
    params = dict(module.named_parameters())  # deduplicates tied weights
    modules = dict(module.named_modules())
    buffers = {name for name, _ in module.named_buffers()}
    specs = []
    for full_name in module.state_dict(keep_vars=True):
        if full_name not in params:
            if full_name in buffers:
                raise NotImplementedError(f"persistent buffer {full_name} cannot be synthesized")
            continue  # the second name of a tied parameter
        owner, _, pname = full_name.rpartition(".")
        kind = _kind(modules[owner], pname, full_name)
        gain = gain_fn(full_name, kind) if gain_fn else 1.0
        specs.append(ParamSpec(full_name, tuple(params[full_name].shape), kind, float(gain)))
    return specs


def write_safetensors(specs: list[ParamSpec], seed: int, namespace: str, folder: Path, stem: str, dtype,
                      shard_bytes: int = 5 * 2**30) -> None:
    """Synthesize and write `stem`.safetensors, or shards plus `stem`.safetensors.index.json (the layout diffusers
    and transformers both read) when the model is bigger than `shard_bytes`: a full-size model is produced one shard
    at a time and never needs to fit in memory. Deterministic: same specs and seed give the same bytes."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[ParamSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    meta = {"format": "pt"}  # what transformers' own save_pretrained writes; older loaders insist on it
    if len(shards) == 1:
        save_file(synthesize(specs, seed, namespace, dtype=dtype), str(folder / f"{stem}.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = synthesize(shard, seed, namespace, dtype=dtype)
        save_file(tensors, str(folder / fname), metadata=meta)
        total += sum(t.numel() * itemsize for t in tensors.values())
        weight_map.update({name: fname for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --- what every family's zoo file needs (one copy here, not one per family) ------------------------------------------
def on_meta(build):
    """build() on the meta device: a model's parameter names and shapes without allocating them."""
    with torch.device("meta"):
        return build()


def plain_linears(specs: list[ParamSpec], patterns: tuple[str, ...]) -> list[ParamSpec]:
    """The linears whose names contain one of `patterns` (adaLN modulation, timestep embedders) drawn without
    outliers (LINEAR_PLAIN), so that shift / scale / gate stay O(0.1..1); every other spec unchanged."""
    return [replace(s, kind=LINEAR_PLAIN) if s.kind == LINEAR and any(p in s.name for p in patterns) else s
            for s in specs]


def check_size(family: str, size: str, sizes: tuple[str, ...], denoiser: str = "transformer",
               denoisers: tuple[str, ...] = ("transformer",)) -> None:
    if size not in sizes:
        raise ValueError(f"unknown {family} size {size!r}; valid sizes: {', '.join(sizes)}")
    if denoiser not in denoisers:
        raise ValueError(f"{family} has denoiser(s) {', '.join(repr(d) for d in denoisers)}; got {denoiser!r}")


def refuse_plant(family: str, sensitive_layer: str | None) -> None:
    """For a zoo that cannot plant a quantization-sensitive layer: refuse the request rather than ignore it."""
    if sensitive_layer is not None:
        raise ValueError(f"the {family} zoo cannot plant a sensitive layer ({sensitive_layer!r}); valid: none "
                         "(this family's zoo plants no sensitive layer)")
