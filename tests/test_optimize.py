"""The speed switches of engine.optimize against the eager engine, on CPU (issue 14): each switch reaches what it
switches, changes the output by no more than the tolerance stated here (bitwise where it is bitwise), and is
refused with a clear error where it cannot run.

CUDA graphs cannot be captured on CPU; their bookkeeping (static input buffers, the replay, the cloned output,
re-capture per input signature) is engine/cuda_graphs.py's GraphedForward, tested here with a stand-in graph that
re-runs the captured call on replay. Planted defects show that each check can fail."""
import pytest
import torch
from torch.utils import _pytree as pytree

from engine.api import OptimizeSpec, RunConfig, bench_inputs, bench_shape, build_denoiser, preflight
from engine.cuda_graphs import GraphedForward
from engine.optimize import optimize
from harness import metrics as M
from harness.zoo import synthesize_transformer_state_dict, transformer_config

FAMILIES = ("flux1", "qwen-image")


def _denoiser(family, quant="none", spec=OptimizeSpec(), dtype=torch.bfloat16):
    tcfg = transformer_config(family, "tiny")
    sd = synthesize_transformer_state_dict(family, "tiny", dtype=dtype)
    model, forward = build_denoiser(family, "transformer", tcfg, sd, quant, spec, "sp1", dtype, "cpu")
    inputs = bench_inputs(family, "transformer", tcfg, bench_shape(height=64, width=64, text_tokens=7, batch=2),
                          dtype, "cpu")
    return model, forward, inputs


# --- fp8_fast_accum --------------------------------------------------------------------------------------------------
@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Every torch._scaled_mm call's use_fast_accum, recorded around the real kernel."""
    calls, real = [], torch._scaled_mm

    def recording(*args, **kwargs):
        calls.append(kwargs.get("use_fast_accum", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_fast_accum_reaches_scaled_mm_and_stays_in_fp8_tolerance(family, scaled_mm_calls, one_thread):
    _, plain, inputs = _denoiser(family, "fp8")
    _, fast, _ = _denoiser(family, "fp8", OptimizeSpec(fp8_fast_accum=True))
    _, bf16, _ = _denoiser(family)
    with torch.no_grad():
        want, reference = plain(inputs), bf16(inputs)
        n_plain = len(scaled_mm_calls)
        got = fast(inputs)
    assert n_plain > 0 and not any(scaled_mm_calls[:n_plain])
    assert len(scaled_mm_calls) == 2 * n_plain and all(scaled_mm_calls[n_plain:]), "the flag did not reach every call"
    # CPU's _scaled_mm has one accumulation mode: measured bitwise equal with and without the flag (torch 2.14.1).
    # On Hopper the flag changes the sums; the GPU suite's fp8 cells judge that against the fp8 floors.
    assert torch.equal(got, want)
    # and so within the fp8 W8A8 error against bf16 that the smoke suite gates (single-step cosine floor 0.99).
    assert float(M.cosine(got.float(), reference.float()).min()) >= 0.99


@pytest.mark.parametrize("quant", ["none", "fp8-wo", "nvfp4"])
def test_fp8_fast_accum_refused_without_a_scaled_mm_linear(quant, one_thread):
    with pytest.raises(ValueError, match="no fp8 W8A8 linear running torch._scaled_mm"):
        _denoiser("flux1", quant, OptimizeSpec(fp8_fast_accum=True))


def test_fp8_fast_accum_refused_by_preflight_for_other_quant_modes():
    cfg = RunConfig(family="flux1", model_dir="/nonexistent", prompts=("a",), quant="fp8-wo",
                    optimize=OptimizeSpec(fp8_fast_accum=True))
    with pytest.raises(ValueError, match="fp8_fast_accum needs quant mode 'fp8'.*'fp8-wo'"):
        preflight(cfg)


def test_fp8_fast_accum_skips_the_emulated_twin(one_thread):
    from engine.quant.api import QuantSpec, quantize_
    from engine.quant.linear import enable_fp8_fast_accum

    model = torch.nn.ModuleDict({"blocks": torch.nn.ModuleList([torch.nn.Linear(32, 32)])})
    quantize_(model, QuantSpec("fp8", fp8_backend="emulated"))
    assert enable_fp8_fast_accum(model) == 0 and not model["blocks"][0].fast_accum


# --- fp8_wo_output_scale -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k, n, m", [(64, 96, 33), (3072, 3072, 256)])
def test_fp8_wo_output_scale_layer_error_matches_the_dequantizing_path(dtype, k, n, m, one_thread, monkeypatch):
    """Against float64 math on the same fp8 weight: the output-scaled linear's relative error is at most 1.25x the
    default path's (measured 0.99x-1.05x: 0.0023 in bf16, 1.4e-7-2.6e-7 in fp32). Both round the result twice-ish:
    the default rounds each weight to the compute dtype, this one rounds the unscaled output before scaling."""
    from engine.quant.linear import Fp8Linear, LinearOptions

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g) * 0.01
    x = torch.randn(m, k, generator=g).to(dtype)
    linear = Fp8Linear.from_float(w, b, (n,), dtype, LinearOptions(act=False))
    exact = x.double() @ linear.dequantize_weight().double().t() + linear.bias.double()
    default = linear(x)
    linear.output_scale = True

    def no_dequantize(*_):
        raise AssertionError("the output-scaled path dequantized the weight")
    monkeypatch.setattr(Fp8Linear, "dequantize_weight", no_dequantize)
    scaled = linear(x)
    assert scaled.dtype == dtype and scaled.shape == (m, n)
    assert not torch.equal(scaled, default)  # the switch took the other path (a no-op switch would pass the bound)

    def rel(y):
        return float((y.double() - exact).norm() / exact.norm())
    assert rel(scaled) <= 1.25 * rel(default)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_wo_output_scale_denoiser_against_eager_fp8_wo(family, one_thread):
    """The tiny denoiser in bf16: output-scaled fp8-wo against the default fp8-wo, cosine >= 0.9998 (measured
    0.999955 FLUX.1, 0.999981 Qwen-Image: bf16 rounding, not quantization: the weights are the same codes), and no
    further from bf16 than the default is (measured 0.99958 vs 0.99952, 0.99977 vs 0.99977)."""
    _, scaled, inputs = _denoiser(family, "fp8-wo", OptimizeSpec(fp8_wo_output_scale=True))
    _, default, _ = _denoiser(family, "fp8-wo")
    _, bf16, _ = _denoiser(family)
    with torch.no_grad():
        got, want, reference = scaled(inputs).float(), default(inputs).float(), bf16(inputs).float()
    assert not torch.equal(got, want)  # the switch reached the linears
    assert float(M.cosine(got, want).min()) >= 0.9998
    assert 1 - float(M.cosine(got, reference).min()) <= 1.25 * (1 - float(M.cosine(want, reference).min()))


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_fp8_wo_output_scale_refused_without_a_weight_only_fp8_linear(quant, one_thread):
    with pytest.raises(ValueError, match="no fp8 weight-only linear"):
        _denoiser("flux1", quant, OptimizeSpec(fp8_wo_output_scale=True))
    cfg = RunConfig(family="flux1", model_dir="/nonexistent", prompts=("a",), quant=quant,
                    optimize=OptimizeSpec(fp8_wo_output_scale=True))
    with pytest.raises(ValueError, match="fp8_wo_output_scale needs quant mode 'fp8-wo'"):
        preflight(cfg)


# --- cuda_graphs: refused off CUDA -----------------------------------------------------------------------------------
def test_cuda_graphs_refused_on_cpu_naming_the_valid_devices(one_thread):
    with pytest.raises(ValueError, match=r"cuda_graphs needs a CUDA device \(valid: cuda, cuda:N\).*cpu"):
        _denoiser("flux1", spec=OptimizeSpec(cuda_graphs=True))
    cfg = RunConfig(family="flux1", model_dir="/nonexistent", prompts=("a",), optimize=OptimizeSpec(cuda_graphs=True))
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        preflight(cfg)  # before any folder is read


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graphs_refuse_a_compile_mode_with_graphs_of_its_own(mode):
    with pytest.raises(ValueError, match=f"compile_mode {mode!r}.*max-autotune-no-cudagraphs"):
        OptimizeSpec(cuda_graphs=True, compile_blocks=True, compile_mode=mode).check("cuda")
    OptimizeSpec(cuda_graphs=True, compile_blocks=True, compile_mode="max-autotune-no-cudagraphs").check("cuda")


# --- cuda_graphs: the wrapper's bookkeeping, with a stand-in graph ---------------------------------------------------
class ReplayingGraph:
    """A Graph that 'replays' by re-running the captured call on the static buffers it closed over and writing the
    result into the tensors capture returned, as a CUDA graph writes into its static output."""

    def __init__(self):
        self.warmups = 0

    def warmup(self, run):
        self.warmups += 1
        run()

    def capture(self, run):
        self.run = run
        self.out = run()
        return self.out

    def replay(self):
        for static, new in zip(pytree.tree_leaves(self.out), pytree.tree_leaves(self.run())):
            static.copy_(new)


class NoCopy(GraphedForward):
    """Planted: the static input buffers ignore every copy into them, so replays see the first call's inputs."""

    def _capture(self, leaves, spec):
        entry = super()._capture(leaves, spec)
        for static in entry.static:
            if isinstance(static, torch.Tensor):
                static.copy_ = lambda *args, _s=static, **kwargs: _s
        return entry


class NoClone(GraphedForward):
    """Planted: returns the static output itself, which the next replay overwrites."""

    def __call__(self, *args, **kwargs):
        super().__call__(*args, **kwargs)
        return next(reversed(self.graphs.values())).out


class NoRecapture(GraphedForward):
    """Planted: keys graphs on nothing, so a new shape replays the old graph."""

    def __call__(self, *args, **kwargs):
        if self.graphs:
            entry = next(iter(self.graphs.values()))
            for static, x in zip(entry.static, pytree.tree_leaves((args, kwargs))):
                if isinstance(x, torch.Tensor) and x.shape == static.shape:
                    static.copy_(x)
            entry.graph.replay()
            return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.out)
        return super().__call__(*args, **kwargs)


def graph_defects(cls, fn, make_input) -> list[str]:
    """What a graphed `fn` gets wrong against calling fn: stale inputs, an output later overwritten, a shape change
    served by the old graph, or a number of captures other than one per signature (none: the graph is not used)."""
    graphed = cls(fn, new_graph=ReplayingGraph)
    a, b, c = make_input(0, 1), make_input(1, 1), make_input(2, 2)  # b: same shape as a; c: another shape
    want_a, want_b, want_c = fn(*a), fn(*b), fn(*c)
    defects = []
    got_a = graphed(*a)
    got_b = graphed(*b)
    if not torch.equal(got_b, want_b):
        defects.append("stale inputs")
    if not torch.equal(got_a, want_a):
        defects.append("output overwritten by a later replay")
    try:
        got_c = graphed(*c)
        if got_c.shape != want_c.shape or not torch.equal(got_c, want_c):
            defects.append("shape change not re-captured")
    except RuntimeError:
        defects.append("shape change not re-captured")
    if not torch.equal(graphed(*a), want_a):
        defects.append("wrong output for a signature seen before")
    if graphed.captures != 2:
        defects.append(f"{graphed.captures} captures for 2 signatures")
    return defects


def _toy_forward():
    weight = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))

    def fn(x, scale):
        return (x @ weight).tanh() * scale

    def make_input(seed, rows):
        return torch.randn(rows, 3, 8, generator=torch.Generator().manual_seed(seed)), 2.0

    return fn, make_input


def test_graphed_forward_copies_inputs_clones_outputs_and_recaptures():
    fn, make_input = _toy_forward()
    assert graph_defects(GraphedForward, fn, make_input) == []


class NoGraph(GraphedForward):
    """Planted: calls the function every time; right answers, no graph."""

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("plant, defect", [(NoCopy, "stale inputs"), (NoClone, "output overwritten by a later replay"),
                                           (NoRecapture, "shape change not re-captured"),
                                           (NoGraph, "0 captures for 2 signatures")])
def test_graph_checks_catch_planted_defects(plant, defect):
    fn, make_input = _toy_forward()
    assert defect in graph_defects(plant, fn, make_input)


def test_graphed_forward_keys_non_tensor_arguments_and_evicts_the_oldest():
    fn, make_input = _toy_forward()
    graphed = GraphedForward(fn, new_graph=ReplayingGraph, max_graphs=2)
    x, _ = make_input(0, 1)
    for scale in (1.0, 2.0, 1.0, 3.0):
        assert torch.equal(graphed(x, scale), fn(x, scale))
    assert graphed.captures == 3 and len(graphed.graphs) == 2
    with pytest.raises(TypeError, match="must be hashable"):
        graphed(x, {1.0})  # a set is one pytree leaf, and unhashable: it cannot key a captured graph


@pytest.mark.parametrize("family", FAMILIES)
def test_graphed_denoiser_is_bitwise_the_eager_one(family, one_thread):
    """The whole tiny denoiser behind GraphedForward (stand-in graph): every call bitwise equal to eager, including a
    second input of the same signature (replay on refreshed buffers) and a batch of another size (re-capture)."""
    model, forward, inputs = _denoiser(family)
    with torch.no_grad():
        eager = forward(inputs)
        other = {k: (v.flip(0) if isinstance(v, torch.Tensor) and v.shape[:1] == (2,) else v) for k, v in inputs.items()}
        eager_other = forward(other)
        single = {k: (v[:1] if isinstance(v, torch.Tensor) and v.shape[:1] == (2,) else v) for k, v in inputs.items()}
        eager_single = forward(single)
        model.forward = GraphedForward(model.forward, new_graph=ReplayingGraph)
        assert torch.equal(forward(inputs), eager)
        assert torch.equal(forward(other), eager_other)
        assert torch.equal(forward(single), eager_single)
        assert model.forward.captures == 2


def test_optimize_wraps_the_forward_last(monkeypatch, one_thread):
    """optimize(cuda_graphs) puts the graph around the whole forward after every other switch, and the family's
    forward goes through it: shown on CPU with the device check answered 'cuda' and the stand-in graph injected."""
    import engine.optimize as O

    monkeypatch.setattr(O, "model_device", lambda model: torch.device("cuda"))
    monkeypatch.setattr(O, "GraphedForward", lambda fn: GraphedForward(fn, new_graph=ReplayingGraph))
    _, eager, inputs = _denoiser("flux1", "fp8")
    model, graphed, _ = _denoiser("flux1", "fp8", OptimizeSpec(cuda_graphs=True, fp8_fast_accum=True))
    assert isinstance(model.forward, GraphedForward)
    with torch.no_grad():
        assert torch.equal(graphed(inputs), eager(inputs))
        assert torch.equal(graphed(inputs), eager(inputs))
    assert model.forward.captures == 1
