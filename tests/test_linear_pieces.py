"""engine.models.common.linear_pieces: a fused projection (q, k, v; SwiGLU's halves; FLUX.1's linear1) cut into
pieces. Eager on a plain linear every piece is its own GEMM and comes out contiguous (strided views of one GEMM ran
CUDA's slow elementwise kernels: the eager engine was slower than diffusers); the values are the whole GEMM's,
bit for bit on CPU. Compiled, and on a quantized linear, one GEMM split."""
import torch
from torch import nn

from engine.models.common import linear_pieces
from engine.quant.api import QuantSpec, quantize_

SIZES = (24, 24, 40)


def _linear(dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(32, sum(SIZES)).to(dtype)


def test_eager_pieces_are_contiguous_and_the_whole_gemms_bits():
    for dtype in (torch.float32, torch.bfloat16):
        linear = _linear(dtype)
        x = torch.randn(2, 7, 32, dtype=dtype)
        pieces = linear_pieces(linear, x, SIZES)
        whole = linear(x).split(SIZES, dim=-1)
        assert [p.shape[-1] for p in pieces] == list(SIZES)
        assert all(p.is_contiguous() for p in pieces)  # views of one GEMM are not: the point of the cut
        assert all(torch.equal(p, w) for p, w in zip(pieces, whole))


def test_a_quantized_linear_runs_whole_and_is_split():
    model = nn.Sequential(_linear())
    quantize_(model, QuantSpec("fp8-wo"))
    assert type(model[0]) is not nn.Linear
    x = torch.randn(2, 7, 32)
    pieces = linear_pieces(model[0], x, SIZES)
    assert all(torch.equal(p, w) for p, w in zip(pieces, model[0](x).split(SIZES, dim=-1)))


def test_compiled_code_keeps_one_gemm():
    linear = _linear()
    x = torch.randn(2, 7, 32)
    graphs = []

    def backend(gm, _):
        graphs.append(gm)
        return gm

    out = torch.compile(lambda t: linear_pieces(linear, t, SIZES), backend=backend, fullgraph=True)(x)
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    assert len(calls) == 1, graphs[0].code
    assert all(torch.equal(p, w) for p, w in zip(out, linear(x).split(SIZES, dim=-1)))


def test_a_hooked_linear_is_called_whole():
    """Calibration, the quant oracle and the sensitivity probes watch a linear's input with forward hooks: a linear
    with a hook (its own or a global one) runs whole, so the hook sees every call (a static-calibration checkpoint
    once recorded no input for the cut linears)."""
    linear = _linear()
    x = torch.randn(2, 7, 32)
    seen = []
    handle = linear.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        pieces = linear_pieces(linear, x, SIZES)
    finally:
        handle.remove()
    assert seen == [x.shape]
    assert all(torch.equal(p, w) for p, w in zip(pieces, linear(x).split(SIZES, dim=-1)))
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m)))
    try:
        linear_pieces(linear, x, SIZES)
    finally:
        handle.remove()
    assert seen[-1] is nn.Linear
