"""Speed-ups applied to a built model, one switch each, so an accuracy regression can be traced to one flag. Every
switch is a field of OptimizeSpec, which RunConfig holds, so each is a suite axis the gate sees.

optimize() applies them in one order: the quantized linears' switches (fp8 fast accumulation, fp8 weight-only output
scaling, the FP4 weight-only kernel: properties of the quantized linears, set before anything traces them), the
attention kernel, block compilation, then the CUDA graph around the whole forward (last: it captures what the earlier
steps left, compiled kernels too). sp_overlap is read by the parallel wrapper, applied after optimize()
(engine.parallel.api.parallelize).

Compilation is regional: each transformer block is compiled on its own and the conditioning path (timestep,
guidance and pooled-text embeddings) stays eager (why: the comment below).

Not a switch here: fused QKV. The DiT models already build one QKV linear per stream (and single-stream blocks one
linear for QKV and the MLP input) at load, through their key maps, so there is nothing left to fuse; the quantizers
and --quant-ignored-layers see those modules with their checkpoint names (engine/quant/names.py)."""
# The pattern is the flux-fast project's `optimize()`, with every step optional. Compiling the whole forward let
# inductor fuse the bf16 `timestep * 1000` into the sinusoid in float32, skipping the bf16 rounding the model was run
# with; at t ~ 750 that rounding moves t by up to 2, which rotates the high-frequency embedding channels: the compiled
# output had cosine 0.53 against eager on full-size FLUX.1 (H100) and 0.94 on the tiny zoo (CPU). The smoke suite's
# compiled cell catches that regression (tests/test_sweep.py plants it).
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import attention_backend
from engine.cuda_graphs import GraphedForward
from engine.quant.linear import enable_fp4_wo_kernel, enable_fp8_fast_accum, enable_fp8_wo_output_scale

GRAPH_DEVICES = ("cuda", "cuda:N")
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs themselves
FP4_WO_MODES = ("nvfp4-wo", "mxfp4-wo")  # the quant modes whose linears fp4_wo_kernel switches


@dataclass(frozen=True)
class OptimizeSpec:
    compile_blocks: bool = False
    attention: str = "sdpa"
    compile_mode: str | None = None  # torch.compile mode, e.g. "max-autotune-no-cudagraphs"
    # torch._scaled_mm(use_fast_accum=True) in fp8 W8A8 linears: Hopper accumulates in its faster, less precise
    # fp8 tensor-core accumulator (ANCHORS 8: 870-1160 -> 980-1255 TFLOP/s). CPU has no such mode: the flag reaches
    # the call and changes nothing there. Refused on a model without a _scaled_mm fp8 W8A8 linear.
    fp8_fast_accum: bool = False
    # fp8 weight-only linears multiply the matmul output by the per-row weight scale instead of dequantizing the
    # weight (engine/quant/linear.py Fp8Linear.forward): the per-call weight work is an exact fp8 cast, and eager no
    # longer writes a float32 copy of every weight per call. With compile_mode "max-autotune-no-cudagraphs"
    # inductor may fold the cast into a Triton GEMM's prologue. Refused on a model without such a linear.
    fp8_wo_output_scale: bool = False
    # FP4 weight-only linears (nvfp4-wo, mxfp4-wo) run a W4A16 Triton GEMM that dequantizes each weight tile in
    # registers (engine/quant/w4a16.py) instead of writing the whole dequantized weight every call. Its tiles equal
    # the eager weight bitwise: only the summation order differs. CUDA, or CPU under Triton's interpreter
    # (TRITON_INTERPRET=1, how the tests run it). Refused for other quant modes. Slower than the default today: on an
    # H100 the kernel reaches 230-390 TFLOP/s against cuBLAS bf16's 720-830 (its per-element decode is ALU-bound),
    # and full-size FLUX.1 nvfp4-wo compiled + graphs takes 271 ms with it, 164 ms without (inductor's fused dequant
    # to bf16, then cuBLAS), bf16 131 ms (2026-11-28, one run). Kept, gated, as the base for a cheaper decode.
    fp4_wo_kernel: bool = False
    # Capture the denoiser forward in a CUDA graph per input shape and replay it (engine/cuda_graphs.py): removes
    # the launch gaps (~5.5 ms of a compiled FLUX.1 forward on an H100). CUDA only.
    cuda_graphs: bool = False
    # Under sequence parallelism with Ulysses: a model's work that does not depend on attention (FLUX.1's single-
    # stream MLP input projection) runs while the all-to-alls are in flight, its fused projection cut by rows into
    # GEMMs of their own (engine.attention.attend_beside). The same bits on CPU; nothing changes on one device or
    # without Ulysses. Off: the A/B on 4 x H200 (tools/sp_bench.py +overlap configs, full-size FLUX.1 1024px, one run,
    # 2026-11-28) measured it slower: ulysses2 82.1 vs 80.3 ms, ulysses4 46.6 vs 45.3, usp2x2 49.7 vs 48.0.
    sp_overlap: bool = False

    def check(self, device: str | torch.device, quant: str | None = None) -> None:
        """Raise if this spec cannot run on `device` with quant mode `quant` (None: not known yet); preflight calls
        it before any weight is loaded, optimize() again on the built model."""
        attention_backend(self.attention)
        if self.cuda_graphs and self.compile_mode in INDUCTOR_GRAPH_MODES:
            raise ValueError(f"optimize.cuda_graphs with compile_mode {self.compile_mode!r}: that mode already records "
                             "CUDA graphs of its own (inductor's cudagraph trees) and cannot run inside ours; use "
                             "compile_mode 'max-autotune-no-cudagraphs' or None")
        if self.fp8_fast_accum and quant is not None and quant != "fp8":
            raise ValueError(f"optimize.fp8_fast_accum needs quant mode 'fp8' (W8A8 through torch._scaled_mm); "
                             f"this run's quant mode is {quant!r}")
        if self.fp8_wo_output_scale and quant is not None and quant != "fp8-wo":
            raise ValueError(f"optimize.fp8_wo_output_scale needs quant mode 'fp8-wo' (fp8 weight-only); this run's "
                             f"quant mode is {quant!r}")
        if self.fp4_wo_kernel and quant is not None and quant not in FP4_WO_MODES:
            raise ValueError(f"optimize.fp4_wo_kernel needs an FP4 weight-only quant mode (valid: "
                             f"{', '.join(FP4_WO_MODES)}); this run's quant mode is {quant!r}")
        if self.fp4_wo_kernel and torch.device(device).type != "cuda" and not _triton_interprets():
            raise ValueError(f"optimize.fp4_wo_kernel runs a Triton kernel: it needs a CUDA device (valid: "
                             f"{', '.join(GRAPH_DEVICES)}), or TRITON_INTERPRET=1 to interpret it on "
                             f"{torch.device(device)} (slow; tests only)")
        if self.cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError(f"optimize.cuda_graphs needs a CUDA device (valid: {', '.join(GRAPH_DEVICES)}); "
                             f"the model runs on {torch.device(device)}")


def _triton_interprets() -> bool:
    from engine.quant.w4a16 import interpreting

    return interpreting()


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of a DiT: every ModuleList child of the model (looking inside a parallel wrapper)."""
    model = getattr(model, "inner", model)
    blocks = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks to compile")
    return blocks


def model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    if tensor is None:
        raise ValueError(f"{type(model).__name__} holds no tensors: cannot tell its device")
    return tensor.device


def optimize(model: nn.Module, spec: OptimizeSpec) -> nn.Module:
    spec.check(model_device(model))
    if spec.fp8_fast_accum and enable_fp8_fast_accum(model) == 0:
        raise ValueError("optimize.fp8_fast_accum: the model has no fp8 W8A8 linear running torch._scaled_mm "
                         "(quant mode 'fp8' with the scaled_mm backend: CPU, or CUDA sm89+ in bf16); nothing to switch")
    if spec.fp8_wo_output_scale and enable_fp8_wo_output_scale(model) == 0:
        raise ValueError("optimize.fp8_wo_output_scale: the model has no fp8 weight-only linear that dequantizes per "
                         "call (quant mode 'fp8-wo' without cache_dequant); nothing to switch")
    if spec.fp4_wo_kernel and enable_fp4_wo_kernel(model) == 0:
        raise ValueError(f"optimize.fp4_wo_kernel: the model has no FP4 weight-only linear that dequantizes per call "
                         f"(quant mode {' or '.join(FP4_WO_MODES)} without cache_dequant); nothing to switch")
    model.attention = attention_backend(spec.attention)
    if spec.compile_blocks:
        for blocks in block_lists(model):
            for block in blocks:
                block.compile(mode=spec.compile_mode, dynamic=False)
    if spec.cuda_graphs:
        # An instance attribute: nn.Module.__call__ finds it before the class's forward, and everything else the
        # pipeline reads from the model (config, rope(), attention) stays as it was. Parallel wrappers are applied
        # after optimize(), so their per-call checks (the SP replication all-reduce) run eagerly around the graph.
        # A model whose forward must read something on the host first (a data-dependent choice, which no capture
        # can contain) names the sync-free method that forward calls as GRAPH_ENTRY, and that method is graphed.
        entry = getattr(model, "GRAPH_ENTRY", "forward")
        setattr(model, entry, GraphedForward(getattr(model, entry)))
    return model
