"""The W4A16 kernel (engine/quant/w4a16.py) and its switch OptimizeSpec.fp4_wo_kernel, on CPU under Triton's
interpreter: the weight tiles it builds equal the eager dequantized weight, its GEMM equals F.linear on that weight
up to one bf16 rounding, the tiny FLUX.1 denoiser with the switch stays next to the eager one, planted kernel bugs
are caught, and the switch is refused where it cannot run.

The interpreter is chosen per test through the environment (`interpret` below): triton.jit reads TRITON_INTERPRET
when it decorates, and the module decorates its kernel on first use, per interpreter setting, not at import.
Shapes are small (the interpreter runs every program's ops in numpy)."""
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F

from engine.api import OptimizeSpec, RunConfig, bench_inputs, bench_shape, build_denoiser, preflight
from engine.optimize import optimize
from engine.quant import w4a16
from engine.quant.linear import LinearOptions, MXFP4Linear, NVFP4Linear
from harness import metrics as M
from harness.zoo import synthesize_transformer_state_dict, transformer_config

WO = LinearOptions(act=False)
# Several M, N and K tiles on the shapes below (M = 37, N = 96): partial M and N tiles, the grouped tile order; the
# kernel's two dot orientations (SWAP_AB, both autotuned on CUDA).
TILES = {"ab": (16, 64, 64, False), "swapped": (16, 64, 64, True)}


@pytest.fixture
def interpret(monkeypatch, one_thread):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert w4a16.interpreting()


def _weight(n, k, seed=0):
    """Rows spanning 10^-6..1 (NVFP4 block scales down to E4M3 subnormals, MXFP4 exponents far below the bias), an
    all-zero block and outlier columns: every decode branch is hit."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(0, -6, n).unsqueeze(1)
    w[:, :3] *= 20
    w[1, :32] = 0
    return w


def _linear(fmt, n=96, k=128, bias=True, segments=None):
    w, b = _weight(n, k), torch.randn(n, generator=torch.Generator().manual_seed(1)) if bias else None
    if fmt == "nvfp4":
        return NVFP4Linear.from_float(w, b, segments or (n,), torch.bfloat16, WO)
    return MXFP4Linear.from_float(w, b, (n,), torch.bfloat16, WO)


def _kernel(lin, x, tiles):
    if isinstance(lin, NVFP4Linear):
        return w4a16.w4a16_matmul(x, lin.qweight, lin.weight_scale.view(torch.uint8), lin._row_scale_2(), lin.bias,
                                  w4a16.NVFP4, tiles)
    return w4a16.w4a16_matmul(x, lin.qweight, lin.weight_scale, None, lin.bias, w4a16.MXFP4, tiles)


def _tile_weight(lin, swap=True):
    """The bf16 weight the kernel multiplies by, read back through an identity input: each output is one weight times
    1 plus exact zeros, so it is the tile value itself (as a value: the sign of a zero weight does not survive)."""
    eye = torch.eye(lin.in_features, dtype=torch.bfloat16)
    bias, lin.bias = lin.bias, None
    try:
        return _kernel(lin, eye, (128, 64, 64, swap)).t()
    finally:
        lin.bias = bias


CASES = {"nvfp4": dict(fmt="nvfp4"), "nvfp4-fused3": dict(fmt="nvfp4", segments=(32, 32, 32)),
         "mxfp4": dict(fmt="mxfp4")}


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_kernel_weight_tiles_equal_the_eager_dequantized_weight(case, swap, interpret):
    lin = _linear(bias=False, **CASES[case])
    assert torch.equal(_tile_weight(lin, swap), lin.dequantize_weight().to(torch.bfloat16))


# Against F.linear(x, dequantize_weight().to(bf16), bias) on CPU (M = 37: three row tiles of 16, the last partial;
# outputs up to ~100): measured bitwise equal in all six cases (0 of 3552 elements differ; relative error against a
# float64 matmul of the same bf16 operands 1.5e-3 to 1.7e-3 for both, the output's bf16 rounding). Not gated
# bitwise: both sides are float32 sums of the same exact products rounded once to bf16, but in orders that depend on
# the BLAS kernels of the CPU at hand (the interpreter's dot is numpy's), so an element may land on the other side of
# a rounding boundary. The gate: every element within one bf16 ulp of the larger of the two values, and at most 1% of
# elements differing at all. A wrong weight, scale, bias or tile mask moves whole rows or columns by many ulps.
def _ulp_bf16(t):
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp(min=2.0**-126))) - 7)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_f_linear_within_one_bf16_ulp(case, bias, tiles, interpret):
    lin = _linear(bias=bias, **CASES[case])
    x = torch.randn(37, lin.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = F.linear(x, lin.dequantize_weight().to(torch.bfloat16), lin.bias)
    got = _kernel(lin, x, TILES[tiles])
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    assert (diff <= _ulp_bf16(torch.maximum(got.float().abs(), want.float().abs()))).all(), diff.max()
    assert (diff > 0).float().mean() <= 0.01


def test_linear_and_kernel_agree_on_the_format_codes():
    from engine.quant import linear

    assert (linear.W4A16_NVFP4, linear.W4A16_MXFP4) == (w4a16.NVFP4, w4a16.MXFP4)


def test_switched_linear_compiles_whole_through_the_custom_op(interpret):
    """torch.compile traces the op through its fake (fullgraph: no graph break) and runs the same kernel."""
    from engine.quant.linear import enable_fp4_wo_kernel

    torch._dynamo.reset()
    model = torch.nn.Sequential(_linear("mxfp4", n=32, k=64))  # MXFP4: the tiny FLUX.1 test below runs NVFP4
    assert enable_fp4_wo_kernel(model) == 1
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    got, want = compiled(x), model(x)
    assert got.shape == (2, 3, 32) and torch.equal(got, want)
    assert torch.equal(want, w4a16.w4a16_matmul(x.reshape(6, 64), model[0].qweight, model[0].weight_scale, None,
                                                model[0].bias, w4a16.MXFP4).reshape(2, 3, 32))
    torch._dynamo.reset()


# --- planted kernel bugs: a copy of the kernel with one line changed, swapped in from here -----------------------------
PLANTS = {
    "nibbles_swapped": ("tl.join(packed & 0xF, packed >> 4)", "tl.join(packed >> 4, packed & 0xF)"),
    "mxfp4_exponent_off_by_one": ("(sbits << 23).to(tl.float32", "((sbits + 1) << 23).to(tl.float32"),
    "nvfp4_global_scale_dropped": ("w = w * g[:, None]", "w = w * 1.0"),
    # the weight tile's bf16 rounding truncating (the interpreter's own cast) instead of rounding to nearest even
    "tile_rounding_truncates": ("w = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536)", "w = (bits & -65536)"),
}


@pytest.fixture
def plant(monkeypatch, tmp_path):
    def install(name):
        old, new = PLANTS[name]
        source = inspect.getsource(w4a16.w4a16_kernel)
        assert source.count(old) == 1, f"plant {name}: the kernel no longer contains {old!r}"
        path = tmp_path / f"planted_{name}.py"
        path.write_text("import triton.language as tl\n\n\n" + source.replace(old, new))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr(w4a16, "w4a16_kernel", module.w4a16_kernel)
        w4a16._kernel.cache_clear()
    yield install
    w4a16._kernel.cache_clear()


@pytest.mark.parametrize("name, case", [("nibbles_swapped", "nvfp4"), ("mxfp4_exponent_off_by_one", "mxfp4"),
                                        ("nvfp4_global_scale_dropped", "nvfp4-fused3"),
                                        ("tile_rounding_truncates", "nvfp4")])
def test_planted_kernel_bugs_are_caught(name, case, interpret, plant):
    lin = _linear(bias=False, **CASES[case])
    want = lin.dequantize_weight().to(torch.bfloat16)
    assert torch.equal(_tile_weight(lin), want)  # the unplanted kernel passes on this very module
    plant(name)
    assert not torch.equal(_tile_weight(lin), want)
    if name == "tile_rounding_truncates":
        return  # one ulp per weight at most: the output bound is not for this, the tile equality is
    x = torch.randn(37, lin.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    diff = (_kernel(lin, x, TILES["swapped"]).float() - F.linear(x, want).float()).abs()
    assert (diff > _ulp_bf16(F.linear(x, want))).any()


# --- the switch on the tiny FLUX.1 denoiser ---------------------------------------------------------------------------
def _denoiser(quant, spec=OptimizeSpec()):
    tcfg = transformer_config("flux1", "tiny")
    sd = synthesize_transformer_state_dict("flux1", "tiny", dtype=torch.bfloat16)
    model, forward = build_denoiser("flux1", "transformer", tcfg, sd, quant, spec, "sp1", torch.bfloat16, "cpu")
    inputs = bench_inputs("flux1", "transformer", tcfg, bench_shape(height=64, width=64, text_tokens=7, batch=1),
                          torch.bfloat16, "cpu")
    return model, forward, inputs


def test_switch_on_tiny_flux_matches_the_eager_fp4_weight_only_path(interpret, monkeypatch):
    """nvfp4-wo (fused QKV and linear1 modules: one global scale per segment) against the same model without the
    switch, bf16: measured bitwise equal on CPU (the linears' outputs are, see above). Gated at cosine >= 0.99999
    for the reason given above (another CPU's summation order); the weight tiles rounded by truncation (the plant
    tile_rounding_truncates) measured 0.99996 here and fail that. MXFP4's forward branch runs in the
    compile test above (the interpreter is slow: one model here)."""
    model, forward, inputs = _denoiser("nvfp4-wo")  # one build: optimize() then switches its linears in place
    with torch.no_grad():
        want = forward(inputs)
    optimize(model, OptimizeSpec(fp4_wo_kernel=True))
    fp4 = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    assert fp4 and all(m.w4a16 for m in fp4)
    monkeypatch.setattr(NVFP4Linear, "dequantize_weight", lambda self: pytest.fail("dequantized the whole weight"))
    with torch.no_grad():
        got = forward(inputs)
    assert float(M.cosine(got.float(), want.float()).min()) >= 0.99999


# --- refusals -----------------------------------------------------------------------------------------------------
def test_switch_refused_for_other_quant_modes():
    cfg = RunConfig(family="flux1", model_dir="/nonexistent", prompts=("a",), quant="nvfp4",
                    optimize=OptimizeSpec(fp4_wo_kernel=True))
    with pytest.raises(ValueError, match=r"fp4_wo_kernel needs .*valid: nvfp4-wo, mxfp4-wo.*'nvfp4'"):
        preflight(cfg)


def test_switch_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"needs a CUDA device \(valid: cuda, cuda:N\), or TRITON_INTERPRET=1"):
        OptimizeSpec(fp4_wo_kernel=True).check("cpu", "nvfp4-wo")


def test_switch_refused_without_an_fp4_weight_only_linear(interpret):
    with pytest.raises(ValueError, match="no FP4 weight-only linear"):
        _denoiser("none", OptimizeSpec(fp4_wo_kernel=True))


def test_switch_refused_for_float32_linears(interpret):
    model = torch.nn.Sequential(_linear("mxfp4"))
    model[0].dtype = torch.float32
    from engine.quant.linear import enable_fp4_wo_kernel

    with pytest.raises(ValueError, match=r"activations in \['torch.bfloat16', 'torch.float16'\]"):
        enable_fp4_wo_kernel(model)
