"""The quantized-layer oracle: every quantized linear of a quant cell, on real input rows captured during one
forward, against torchao's own reference implementation of the same scheme, and the set of layers a run left
unquantized against what it was asked to leave.

Why: a quantized path can get worse by less than the end-to-end threshold margins (an fp8 activation scale per
tensor instead of per token, NVFP4 W4A4 silently running weight-only) and still pass every image/latent floor.
Judged layer by layer against an independent implementation, the same bugs are plain differences.

The reference starts from the unquantized checkpoint weights (and a checkpoint's calibrated input_scale), quantizes
them and the captured activations with torchao 0.18's reference functions, and runs the matmul as the scheme says:
  fp8       W8A8: e4m3 rows of W (per output channel) and of x (per token), torchao `_choose_scale_float8` /
            `_quantize_affine_float8` with block [1, K]; product of the dequantized fp32 operands, then the compute
            dtype, then the bias. fp8-wo: the weight alone, matmul in the compute dtype.
  nvfp4     torchao `nvfp4_quantize` two-level (per_tensor_scale = amax / (6 * 448) per checkpoint tensor of W);
            activations with the checkpoint's static input_scale, else the dynamic amax of the call. nvfp4-wo:
            the weight alone.
  mxfp4     torchao `to_mx(..., float4_e2m1fn_x2, 32, FLOOR)` / `to_dtype` for W and x. mxfp4-wo: the weight alone.
Where the engine's path equals torchao's bitwise (measured on CPU, see golden/thresholds.toml) the gate is exact.

Rows: comparison `quant_oracle`, metric `layer_output_rel_error` (||engine - torchao|| / ||torchao|| in float64, one
row per quantized layer, the layer in column `layer`); comparison `quant_layers`, metric `layer_set_mismatch` (one
row per cell: layers asked to stay unquantized that were quantized, plus ignore patterns that matched no layer).
Per-layer tables go to quant_oracle.csv and quant_layers.csv in the run folder.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from harness import schema

QUANT_ORACLE = schema.QUANT_ORACLE
QUANT_LAYERS = schema.QUANT_LAYERS
ORACLE_METRIC = "layer_output_rel_error"
LAYERS_METRIC = "layer_set_mismatch"
TOKENS = 8  # rows captured per layer (+ the row with the largest |x|): enough to tell per-token from per-tensor
ORACLE_CSV, LAYERS_CSV = "quant_oracle.csv", "quant_layers.csv"


# --- torchao references, one pure function per format ---------------------------------------------------------------
def fp8_rows(t: torch.Tensor) -> torch.Tensor:
    """e4m3 per row (weights: per output channel; activations: per token), dequantized to fp32."""
    from torchao.quantization.quant_primitives import (
        _choose_scale_float8, _dequantize_affine_float8, _quantize_affine_float8,
    )

    t = t.float().contiguous()
    # hp_value_lb: an all-zero row keeps a finite scale (the engine floors amax at 1e-12 the same way)
    scale = _choose_scale_float8(t, [1, t.shape[-1]], torch.float8_e4m3fn, hp_value_lb=1e-12)
    return _dequantize_affine_float8(_quantize_affine_float8(t, scale, torch.float8_e4m3fn), scale, torch.float32)


def nvfp4_qdq(t: torch.Tensor, per_tensor_scale: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 two-level quantize-dequantize of a 2-D tensor along its last dim, fp32 out; per_tensor_scale None:
    amax(t) / (6 * 448), the dynamic rule."""
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize, per_tensor_amax_to_scale

    t = t.contiguous()
    if per_tensor_scale is None:
        per_tensor_scale = per_tensor_amax_to_scale(t.abs().amax())
    per_tensor_scale = per_tensor_scale.float()
    scales, packed = nvfp4_quantize(t, 16, per_tensor_scale)
    values = f4_unpacked_to_f32(unpack_uint4(packed)).view(t.shape[0], -1, 16) * scales.float().unsqueeze(-1)
    return (values * per_tensor_scale).reshape(t.shape)


def mxfp4_qdq(t: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

    t = t.float().contiguous()
    scale, data = to_mx(t, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.FLOOR)
    return to_dtype(data, scale, torch.float4_e2m1fn_x2, 32, torch.float32)


@dataclass(frozen=True)
class Scheme:
    """How one quant mode computes a linear: its weight rule (per checkpoint tensor), its activation rule (None:
    weight-only) and whether the matmul runs on fp32 dequantized operands (fp8 W8A8's scaled matmul)."""
    weight: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None
    fp32_matmul: bool = False


SCHEMES: dict[str, Scheme] = {
    "fp8": Scheme(fp8_rows, lambda x, static: fp8_rows(x), fp32_matmul=True),
    "fp8-wo": Scheme(fp8_rows, None),
    "nvfp4": Scheme(nvfp4_qdq, nvfp4_qdq),
    "nvfp4-wo": Scheme(nvfp4_qdq, None),
    "mxfp4": Scheme(mxfp4_qdq, lambda x, static: mxfp4_qdq(x)),
    "mxfp4-wo": Scheme(mxfp4_qdq, None),
}


def scheme(mode: str) -> Scheme:
    try:
        return SCHEMES[mode]
    except KeyError:
        raise ValueError(f"no oracle scheme for quant mode {mode!r}; valid: {sorted(SCHEMES)}") from None


def reference_output(mode: str, x: torch.Tensor, source_weights, bias, input_scale, dtype: torch.dtype,
                     weights_in_dtype: bool) -> torch.Tensor:
    """torchao's output of the linear for `mode` on input rows x (compute dtype). weights_in_dtype: online
    quantization starts from the weights cast to the compute dtype; a checkpoint was quantized from them as stored."""
    s = scheme(mode)
    parts = [w.to(x.device, dtype) if weights_in_dtype else w.to(x.device) for w in source_weights]
    w = torch.cat([s.weight(p) for p in parts])  # each checkpoint tensor is its own quantization unit
    b = None if bias is None else bias.to(x.device, dtype)
    input_scale = None if input_scale is None else input_scale.to(x.device)
    if s.act is None:
        return F.linear(x, w.to(dtype), b)
    xq = s.act(x, input_scale)
    if s.fp32_matmul:
        out = (xq @ w.t()).to(dtype)
        return out if b is None else out + b
    return F.linear(xq.to(dtype), w.to(dtype), b)


def rel_error(test: torch.Tensor, ref: torch.Tensor) -> float:
    t, r = test.double(), ref.double()
    if not (torch.isfinite(t).all() and torch.isfinite(r).all()):
        return float("nan")
    denom = float(r.norm())
    diff = float((t - r).norm())
    return diff / denom if denom else (0.0 if diff == 0 else float("inf"))


# --- what was asked vs what was done --------------------------------------------------------------------------------
def matches(pattern: str, name: str) -> bool:
    """The pattern's dot-separated globs as a contiguous run of the name's segments (the README's rule, restated
    here on purpose: the check must not share the engine's resolver)."""
    pat, parts = pattern.split("."), name.split(".")
    return any(all(fnmatch.fnmatchcase(q, p) for q, p in zip(parts[i:i + len(pat)], pat))
               for i in range(len(parts) - len(pat) + 1))


def layer_set(records, patterns: tuple[str, ...]) -> tuple[pd.DataFrame, list[str]]:
    """(one row per linear: asked_unquantized, quantized, mismatch; the patterns that matched no linear)."""
    table = pd.DataFrame([{"denoiser": r.denoiser, "layer": r.layer, "sources": " ".join(r.sources), "kind": r.kind,
                           "quantized": r.quantized,
                           "asked_unquantized": any(matches(p, n) for p in patterns for n in (r.layer, *r.sources))}
                          for r in records],
                         columns=["denoiser", "layer", "sources", "kind", "quantized", "asked_unquantized"])
    table["mismatch"] = table.asked_unquantized & table.quantized
    unmatched = [p for p in patterns
                 if not any(matches(p, n) for r in records for n in (r.layer, *r.sources))]
    return table, unmatched


# --- rows -----------------------------------------------------------------------------------------------------------
def oracle_rows(cell, base: dict, records, dtype: torch.dtype, run_dir: Path) -> list[dict]:
    """Rows of both checks for one quant cell from engine.api.quant_probe's records; tables appended to run_dir."""
    common = {**base, "seed": pd.NA, "prompt_idx": pd.NA, "prompt": "", "step": pd.NA}

    def row(comparison, metric, value, layer="", status="ok", reason=""):
        return {**common, "comparison": comparison, "metric": metric, "value": float(value), "status": status,
                "reason": reason, "layer": layer}

    records = list(records)
    online = cell.quant_source == "online"
    per_layer = []
    for r in records:
        if not r.quantized:
            continue
        ref = reference_output(cell.quant, r.x, r.source_weights, r.bias, r.input_scale, dtype, online)
        err = rel_error(r.y, ref)
        per_layer.append({"cell": cell.name, "denoiser": r.denoiser, "layer": r.layer, "kind": r.kind,
                          "static_input_scale": r.input_scale is not None, "rows": r.x.shape[0],
                          "rel_error": err, "bitwise_equal": bool(torch.equal(r.y, ref))})
    # The layer also goes into `reason`, which the gate appends to a failing row's message: the verdict names it.
    out = [row(QUANT_ORACLE, ORACLE_METRIC, p["rel_error"], f"{p['denoiser']}.{p['layer']}",
               *(("ok", f"layer {p['denoiser']}.{p['layer']} ({p['kind']})") if np.isfinite(p["rel_error"])
                 else ("invalid", f"layer {p['denoiser']}.{p['layer']}: NaN/Inf in the engine or torchao output")))
           for p in per_layer]
    if not per_layer:
        out.append(row(QUANT_ORACLE, ORACLE_METRIC, np.nan, status="invalid",
                       reason=f"quant mode {cell.quant!r} quantized no linear layer: nothing to check"))
    table, unmatched = layer_set(records, cell.quant_ignored)
    table.insert(0, "cell", cell.name)
    bad = table[table.mismatch]
    reason = "; ".join(filter(None, [
        f"asked to stay unquantized but quantized: {', '.join(bad.layer.head(5))}" if len(bad) else "",
        f"patterns that matched no linear: {unmatched}" if unmatched else ""]))
    out.append(row(QUANT_LAYERS, LAYERS_METRIC, len(bad) + len(unmatched), reason=reason))
    for name, frame in ((ORACLE_CSV, pd.DataFrame(per_layer)), (LAYERS_CSV, table)):
        path = Path(run_dir) / name
        frame.to_csv(path, mode="a", header=not path.exists(), index=False)
    return out


def cell_rows(cell, base: dict, engine_cfg, source_dir: Path, inputs, run_dir: Path) -> list[dict]:
    """Both checks of one quant cell: the engine's linears probed through engine.api on the reference's step-0
    inputs (one forward), judged here."""
    from engine.api import quant_probe

    records = quant_probe(engine_cfg, source_dir, inputs, TOKENS)
    return oracle_rows(cell, base, records, engine_cfg.torch_dtype, run_dir)
