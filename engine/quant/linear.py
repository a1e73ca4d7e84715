"""Quantized replacements for nn.Linear: weights stay packed in memory and are dequantized inside forward.

One class per storage format; a flag picks weight-only or weight+activation quantization:
  Fp8Linear    e4m3 weights, fp32 scale per output row. W8A8 adds per-token dynamic e4m3 activations and runs
               torch._scaled_mm (CPU, CUDA sm89+) or its emulated twin; weight-only dequantizes to the compute dtype.
  NVFP4Linear  ModelOpt NVFP4 weights. W4A4 is emulated (Hopper and CPUs have no FP4 matmul): activations are
               quantize-dequantized, weights dequantized, and the matmul runs in the compute dtype.
  MXFP4Linear  OCP MXFP4 weights and activations, emulated the same way.

A fused engine linear (QKV, a single-stream block's linear1) is built from several checkpoint tensors stacked along the output
rows. NVFP4 keeps one global scale per such segment (`segments` holds their row counts), so a fused module
dequantizes to exactly the tensors a per-module ModelOpt export holds, and online quantization of a bf16 folder
gives the same weights as the checkpoint written from it.

The packed codes live in `qweight`, not `weight`: transformers code reads `module.weight.dtype` (T5's FF casts its
input to it), so `weight` is a property returning the dequantized weight in the compute dtype.
Forward holds no data-dependent Python: every branch is on attributes fixed at construction.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant.formats import e2m1, fp8, mxfp4, nvfp4


class Fp8Backend(enum.Enum):
    SCALED_MM = "scaled_mm"  # torch._scaled_mm: fp8 x fp8 with rowwise fp32 scales
    EMULATED = "emulated"  # the same math in fp32 matmuls: the reference twin, and the fallback where _scaled_mm is absent


@dataclass(frozen=True)
class LinearOptions:
    act: bool = True  # quantize activations too (W8A8 / W4A4) or weights only
    fp8_backend: Fp8Backend | None = None  # None: SCALED_MM where it runs (see scaled_mm_runs), else EMULATED
    cache_dequant: bool = False  # keep a dequantized copy (explicit opt-in: it gives back the memory saving)
    swap_nibbles: bool = False  # NVFP4 export stores element 2i in the HIGH nibble


def scaled_mm_runs(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> bool:
    """Whether torch._scaled_mm with rowwise scales runs here. CUDA needs sm89+, bf16 output and K, N % 16 == 0."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    return dtype == torch.bfloat16 and in_features % 16 == 0 and out_features % 16 == 0


def emulated_scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """The twin of torch._scaled_mm(a, b.t(), scale_a, scale_b.t()): a [M, K] fp8 with scale_a [M, 1], b [N, K]
    fp8 with scale_b [N, 1]. Dequantize, then one fp32 matmul (CPU _scaled_mm measured bitwise equal to this)."""
    return ((a.float() * scale_a) @ (b.float() * scale_b).t()).to(out_dtype)


def _buffer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers(recurse=False) if t is not None)


class QuantLinear(nn.Module):
    """Base of the quantized linears: shapes, bias, compute dtype, and the dequantized `weight` view."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, dtype: torch.dtype,
                 options: LinearOptions):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.options = dtype, options
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def dequantize_weight(self) -> torch.Tensor:
        """float32 [out_features, in_features]."""
        raise NotImplementedError

    def _finish(self) -> None:
        # Called last by subclass constructors, once the packed buffers exist.
        cache = self.dequantize_weight().to(self.dtype) if self.options.cache_dequant else None
        self.register_buffer("cached_weight", cache, persistent=False)

    def _weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        if self.options.cache_dequant:
            return self.cached_weight.to(dtype)
        return self.dequantize_weight().to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self._weight_in(self.dtype)

    def weight_bytes(self) -> int:
        """Bytes held by this module: packed weight, scales, bias (and the dequant cache if enabled)."""
        return _buffer_bytes(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act={self.options.act}"


class Fp8Linear(QuantLinear):
    CHECKPOINT_KEYS = ("weight", "weight_scale")
    OPTIONAL_KEYS = ("input_scale",)  # a static activation scale; unused: activations are scaled per token

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, options: LinearOptions):
        out_features, in_features = qweight.shape
        super().__init__(in_features, out_features, bias, dtype, options)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale.float().reshape(out_features, 1))
        backend = options.fp8_backend
        if backend is None:
            backend = (Fp8Backend.SCALED_MM if scaled_mm_runs(qweight.device, dtype, in_features, out_features)
                       else Fp8Backend.EMULATED)
        self.backend = backend
        # torch._scaled_mm's use_fast_accum; set after build by engine.optimize (OptimizeSpec.fp8_fast_accum), before
        # any compile traces forward, so forward still branches only on attributes fixed before the first call.
        self.fast_accum = False
        # Weight-only: scale the matmul's output columns instead of the weight rows (OptimizeSpec.fp8_wo_output_scale).
        self.output_scale = False
        self._finish()

    @classmethod
    def from_float(cls, weight, bias, segments, dtype, options):
        del segments  # per-row scales: fusing rows changes nothing
        codes, scale = fp8.quantize_rows(weight)
        return cls(codes, scale, bias, dtype, options)

    @classmethod
    def from_checkpoint(cls, parts, bias, dtype, options):
        for part in parts:
            if part["weight"].dtype != torch.float8_e4m3fn:
                raise ValueError(f"fp8 checkpoint weight has dtype {part['weight'].dtype}, expected float8_e4m3fn")
        # weight_scale may be per row ([N] or [N, 1]) or per tensor ([] in ModelOpt FP8): expand to per row.
        scales = [p["weight_scale"].float().reshape(-1, 1).expand(p["weight"].shape[0], 1) for p in parts]
        return cls(torch.cat([p["weight"] for p in parts]), torch.cat(scales), bias, dtype, options)

    @staticmethod
    def dequantize_part(part, options: LinearOptions) -> torch.Tensor:
        """One checkpoint tensor's weight as float32 (for a module the loader keeps unquantized)."""
        return fp8.dequantize_rows(part["weight"], part["weight_scale"].float().reshape(-1, 1))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.qweight, "weight_scale": self.weight_scale.reshape(-1)}

    def dequantize_weight(self) -> torch.Tensor:
        return fp8.dequantize_rows(self.qweight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.options.act:
            if self.output_scale:
                # x @ (codes * s)^T == (x @ codes^T) * s per output column. The cast of e4m3 codes to bf16 / fp32 is
                # exact, so the only per-call weight work is that cast (inductor can fold it into a GEMM prologue);
                # the scale and bias are applied in float32 to the matmul's output, then rounded once more.
                out = F.linear(x, self.qweight.to(x.dtype)) * self.weight_scale.t()
                if self.bias is not None:
                    out = out + self.bias
                return out.to(x.dtype)
            return F.linear(x, self._weight_in(x.dtype), self.bias)
        x2 = x.reshape(-1, self.in_features)
        codes, scale = fp8.quantize_rows(x2)
        if self.backend is Fp8Backend.SCALED_MM:
            out = torch._scaled_mm(codes, self.qweight.t(), scale_a=scale, scale_b=self.weight_scale.t(),
                                   out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        else:
            out = emulated_scaled_mm(codes, self.qweight, scale, self.weight_scale, x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", backend={self.backend.value}, fast_accum={self.fast_accum}, "
                f"output_scale={self.output_scale}")


def enable_fp8_fast_accum(model: nn.Module) -> int:
    """Switch every fp8 W8A8 linear of `model` that runs torch._scaled_mm to fast accumulation; return how many.
    The emulated twin and weight-only linears have no accumulator to choose and are left alone."""
    chosen = [m for m in model.modules()
              if isinstance(m, Fp8Linear) and m.options.act and m.backend is Fp8Backend.SCALED_MM]
    for module in chosen:
        module.fast_accum = True
    return len(chosen)


def enable_fp8_wo_output_scale(model: nn.Module) -> int:
    """Switch every fp8 weight-only linear of `model` that dequantizes per call to scaling its output instead; return
    how many. Linears holding a dequantized cache (cache_dequant) have no per-call dequantization to save."""
    chosen = [m for m in model.modules()
              if isinstance(m, Fp8Linear) and not m.options.act and not m.options.cache_dequant]
    for module in chosen:
        module.output_scale = True
    return len(chosen)


class NVFP4Linear(QuantLinear):
    CHECKPOINT_KEYS = ("weight", "weight_scale", "weight_scale_2")
    OPTIONAL_KEYS = ("input_scale",)

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor,
                 segments: tuple[int, ...], input_scale: torch.Tensor | None, bias: torch.Tensor | None,
                 dtype: torch.dtype, options: LinearOptions):
        out_features, in_features = qweight.shape[0], qweight.shape[1] * 2
        if sum(segments) != out_features or weight_scale_2.numel() != len(segments):
            raise ValueError(f"segments {segments} and {weight_scale_2.numel()} global scales do not fit "
                             f"{out_features} rows")
        super().__init__(in_features, out_features, bias, dtype, options)
        self.segments = tuple(segments)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_scale_2", weight_scale_2.float().reshape(-1))
        # A calibrated input_scale makes the activation global scale static; without one (online quantization,
        # or our own tool, which sees no activations) it is computed per call: amax(x) / (6 * 448) over the call.
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))
        self.w4a16 = False  # weight-only: the fused-dequant Triton GEMM (see enable_fp4_wo_kernel)
        self._finish()

    @classmethod
    def from_float(cls, weight, bias, segments, dtype, options):
        packed, scales, scale_2 = [], [], []
        for w in weight.split(list(segments)):
            p, s, s2 = nvfp4.quantize(w)
            packed.append(p)
            scales.append(nvfp4.block_scale_layout(s, *w.shape).contiguous())
            scale_2.append(s2)
        return cls(torch.cat(packed), torch.cat(scales), torch.stack(scale_2), tuple(segments), None, bias, dtype,
                   options)

    @classmethod
    def from_checkpoint(cls, parts, bias, dtype, options):
        packed, scales, rows = [], [], []
        for part in parts:
            w = part["weight"]
            if w.dtype != torch.uint8:
                raise ValueError(f"NVFP4 checkpoint weight has dtype {w.dtype}, expected uint8 (two E2M1 per byte)")
            packed.append(e2m1.swap_nibbles(w) if options.swap_nibbles else w)
            rows.append(w.shape[0])
            scales.append(nvfp4.block_scale_layout(part["weight_scale"], w.shape[0], w.shape[1] * 2).contiguous())
        scale_2 = torch.stack([p["weight_scale_2"].float().reshape(()) for p in parts])
        # Each source tensor was calibrated on the same input, so their input scales agree up to calibration
        # noise; one fused matmul needs one, and the largest never clips what any of them kept (vLLM does the same).
        inputs = [p["input_scale"] for p in parts if "input_scale" in p]
        if inputs and len(inputs) != len(parts):
            raise ValueError("NVFP4 checkpoint has input_scale for some parts of a fused module but not all")
        input_scale = torch.stack([s.float().reshape(()) for s in inputs]).amax() if inputs else None
        return cls(torch.cat(packed), torch.cat(scales), scale_2, tuple(rows), input_scale, bias, dtype, options)

    @staticmethod
    def dequantize_part(part, options: LinearOptions) -> torch.Tensor:
        w = part["weight"]
        w = e2m1.swap_nibbles(w) if options.swap_nibbles else w
        scale = nvfp4.block_scale_layout(part["weight_scale"], w.shape[0], w.shape[1] * 2)
        return nvfp4.dequantize(w, scale, part["weight_scale_2"])

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        if len(self.segments) != 1:
            raise ValueError("a fused NVFP4 module has one global scale per segment: export its parts")
        out = {"weight": self.qweight, "weight_scale": self.weight_scale,
               "weight_scale_2": self.weight_scale_2.reshape(())}
        if self.input_scale is not None:
            out["input_scale"] = self.input_scale
        return out

    def _row_scale_2(self) -> torch.Tensor:
        if len(self.segments) == 1:
            return self.weight_scale_2
        return torch.cat([self.weight_scale_2[i].expand(n) for i, n in enumerate(self.segments)])

    def dequantize_weight(self) -> torch.Tensor:
        return nvfp4.dequantize(self.qweight, self.weight_scale, self._row_scale_2())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4a16:
            return torch.ops.parity.w4a16_linear(x, self.qweight, self.weight_scale.view(torch.uint8),
                                                 self.kernel_scale_2, self.bias, W4A16_NVFP4)
        if self.options.act:
            scale_2 = self.input_scale if self.input_scale is not None else nvfp4.global_scale(x.abs().amax())
            x = nvfp4.quantize_dequantize(x, scale_2).to(x.dtype)
        return F.linear(x, self._weight_in(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", segments={self.segments}, static_input_scale={self.input_scale is not None}"
                f", w4a16={self.w4a16}")


class MXFP4Linear(QuantLinear):
    """Online only: no checkpoint layout is defined for MXFP4 folders here."""

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, options: LinearOptions):
        super().__init__(qweight.shape[1] * 2, qweight.shape[0], bias, dtype, options)
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.w4a16 = False  # weight-only: the fused-dequant Triton GEMM (see enable_fp4_wo_kernel)
        self._finish()

    @classmethod
    def from_float(cls, weight, bias, segments, dtype, options):
        del segments  # block scales only: fusing rows changes nothing
        return cls(*mxfp4.quantize(weight), bias, dtype, options)

    def dequantize_weight(self) -> torch.Tensor:
        return mxfp4.dequantize(self.qweight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4a16:
            return torch.ops.parity.w4a16_linear(x, self.qweight, self.weight_scale.view(torch.uint8), None,
                                                 self.bias, W4A16_MXFP4)
        if self.options.act:
            x = mxfp4.quantize_dequantize(x).to(x.dtype)
        return F.linear(x, self._weight_in(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w4a16={self.w4a16}"


BLOCK_SIZES: dict[type, int] = {Fp8Linear: 1, NVFP4Linear: nvfp4.BLOCK, MXFP4Linear: mxfp4.BLOCK}
W4A16_NVFP4, W4A16_MXFP4 = 0, 1  # engine/quant/w4a16.py's FORMAT values (that module imports Triton: loaded on demand)
W4A16_DTYPES = (torch.bfloat16, torch.float16)


def enable_fp4_wo_kernel(model: nn.Module) -> int:
    """Switch every FP4 weight-only linear of `model` that dequantizes per call (NVFP4 / MXFP4, act=False, no
    cache_dequant) to the W4A16 Triton kernel (engine/quant/w4a16.py); return how many. Its weight tiles equal the
    eager dequantized weight bitwise, so outputs differ from the eager path only by summation order. The kernel takes
    bf16 / fp16 activations: a linear computing in another dtype is an error, not skipped."""
    from engine.quant import w4a16  # noqa: F401  (registers torch.ops.parity.w4a16_linear)

    chosen = {n: m for n, m in model.named_modules()
              if isinstance(m, (NVFP4Linear, MXFP4Linear)) and not m.options.act and not m.options.cache_dequant}
    wrong = sorted(n for n, m in chosen.items() if m.dtype not in W4A16_DTYPES)
    if wrong:
        raise ValueError(f"the W4A16 kernel takes activations in {[str(d) for d in W4A16_DTYPES]}; these linears "
                         f"compute in {chosen[wrong[0]].dtype}: {wrong[:5]}")
    for module in chosen.values():
        if isinstance(module, NVFP4Linear):
            # Each row's global scale, [1] for one segment or [N] for a fused module: once, not per call.
            scale_2 = module._row_scale_2().contiguous()
            module.register_buffer("kernel_scale_2", scale_2, persistent=False)
        module.w4a16 = True
    return len(chosen)
