"""Independent work under the Ulysses all-to-alls (OptimizeSpec.sp_overlap; engine.attention.attend_beside,
engine.parallel.attention.BesideWork): FLUX.1's single-stream block cuts linear1 into a QKV GEMM and MLP-row GEMMs
and hands the MLP rows (with their GELU) to the sequence-parallel attention, which runs them while its transfers are
in flight. It must change no bit.

- On one process: rows of a linear as their own GEMM equal the fused GEMM's columns bit for bit (fp32 and bf16);
  the cut block equals the fused one; a quantized linear is never cut.
- On CPU/gloo, FLUX.1 tiny in fp32 (text sharded with the image, as FLUX.1 runs; 30 image tokens and 7 text tokens,
  so shards are uneven on 4 ranks and the text's on 2): overlap on equals overlap off bitwise on ulysses4, usp2x2
  and cfg2-ulysses2 (each half a ulysses2 with 2 head pieces), eager; on ulysses2 with the blocks compiled by
  inductor too. Plants: the MLP rows taken one row off (the last QKV row in), and the two parts of the work put
  back in the wrong order, each must differ with overlap on (and change nothing with it off: they live in the
  overlap path).
- The compiled single-stream block runs the work where it hides something: inductor's code has an MLP GEMM between
  the first all-to-all and its wait, and another between the last inverse all-to-all and its wait. Plant: every
  part of the work run after the attention (BesideWork.run_first doing nothing) must fail that check.
"""
from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine.attention import attend_beside, hides_work, sdpa_attention
from engine.models import flux1
from engine.models.common import linear_rows

TOKENS, TEXT = 30, 7  # 5 x 6 latent patches; uneven on 4 ranks (8, 8, 7, 7), and the text on 2 and 4


def _tiny_model(seed: int = 0) -> flux1.Flux1Transformer:
    from harness.zoo import transformer_config

    torch.manual_seed(seed)
    return flux1.Flux1Transformer(flux1.Flux1Config.from_diffusers(transformer_config("flux1", "tiny"))).eval()


def _inputs(model, seed: int = 1) -> tuple:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij"), -1).flatten(0, 1)
    return (torch.randn(1, TOKENS, cfg.in_channels, generator=g), torch.randn(1, TEXT, cfg.joint_attention_dim, generator=g),
            torch.tensor([0.7]), torch.randn(1, cfg.pooled_projection_dim, generator=g),
            torch.cat([torch.zeros(TOKENS, 1), ids.float()], 1), torch.zeros(TEXT, 3), torch.tensor([3.5]))


# --- one process ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_a_linear_are_the_fused_gemms_columns(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 288 + 384).to(dtype)
    x = torch.randn(2, 19, 96).to(dtype)
    whole = linear(x)
    for lo, hi in ((0, 288), (288, 480), (480, 672), (5, 17)):
        assert torch.equal(linear_rows(linear, lo, hi)(x), whole[..., lo:hi]), (lo, hi)


def test_only_a_plain_linear_is_cut():
    class Packed(nn.Module):  # stands for a quantized linear: not an nn.Linear, its weight not float rows
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, x):
            return self.linear(x)
    block = flux1.SingleStreamBlock(_tiny_model().config)
    assert linear_rows(Packed(block.linear1), 0, 1) is None
    h = torch.randn(1, 3, block.dim)
    want_qkv, want = block._projections(h, False)
    block.linear1 = Packed(block.linear1)
    qkv, work = block._projections(h, True)
    # The fused path: one GEMM, its GELU the only work; the same values.
    assert len(work) == 1 and torch.equal(qkv, want_qkv) and torch.equal(work[0](), want[0]())


def test_cut_single_block_equals_the_fused_one(one_thread):
    model = _tiny_model()
    block = model.single_blocks[0]
    h = torch.randn(2, 11, block.dim)
    qkv_f, work_f = block._projections(h, False)
    qkv_c, work_c = block._projections(h, True)
    assert len(work_f) == 1 and len(work_c) == block.MLP_PIECES
    assert torch.equal(qkv_f, qkv_c)
    assert torch.equal(work_f[0](), torch.cat([w() for w in work_c], dim=-1))


def test_plain_attention_runs_the_work_after_it():
    calls = []

    def attention(q, k, v):
        calls.append("attention")
        return q
    assert not hides_work(attention) and not hides_work(sdpa_attention)
    out, results = attend_beside(attention, torch.ones(1), None, None,
                                 [lambda: calls.append("w0") or torch.zeros(1), lambda: calls.append("w1") or None])
    assert calls == ["attention", "w0", "w1"] and torch.equal(results[0], torch.zeros(1)) and results[1] is None


# --- ranks --------------------------------------------------------------------------------------------------------
def _wrapped(parallel: str):
    from engine.parallel.config import parse_parallel
    from engine.parallel.mesh import get_mesh
    from engine.pipelines.flux1 import Flux1SequenceParallel

    model = Flux1SequenceParallel(_tiny_model(), get_mesh(parse_parallel(parallel)))
    model.replication_check_every = 0
    return model


def _forward(model, inputs, overlap: bool) -> torch.Tensor:
    model.set_overlap(overlap)
    with torch.no_grad():
        return model(*inputs)


def reordered_parts(real):
    """Plant: BesideWork handed the work back to front, so its results come back in the wrong order."""
    return lambda work: real(list(work)[::-1])


def _plants(model, inputs, clean_on: torch.Tensor) -> dict:
    from engine.parallel import attention as sp_attention

    out = {}
    real_rows, real_beside = flux1.linear_rows, sp_attention.BesideWork
    # The MLP rows one row off: the last QKV row in, the last MLP row out of the first piece.
    plants = {"mlp_rows_off_by_one": (flux1, "linear_rows",
                                      lambda lin, lo, hi: real_rows(lin, lo - 1 if lo else lo, hi - 1 if lo else hi)),
              "parts_reordered": (sp_attention, "BesideWork", reordered_parts(real_beside))}
    for name, (module, attr, planted) in plants.items():
        real = getattr(module, attr)
        setattr(module, attr, planted)
        try:
            on, off = _forward(model, inputs, True), _forward(model, inputs, False)
        finally:
            setattr(module, attr, real)
        out[name] = ((on - clean_on).abs().max().item(), torch.equal(off, _forward(model, inputs, False)))
    return out


def _eager_worker(rank: int, store: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4)
    results = {}
    for parallel in ("ulysses4", "usp2x2", "cfg2-ulysses2"):
        model = _wrapped(parallel)
        inputs = _inputs(model.inner)
        off, on = _forward(model, inputs, False), _forward(model, inputs, True)
        results[("bitwise", parallel)] = torch.equal(on, off)
        results[("hides", parallel)] = hides_work(model.inner.attention)
        if parallel == "cfg2-ulysses2":
            results[("plants", parallel)] = _plants(model, inputs, on)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_overlap_is_bitwise_off_on_every_mesh(tmp_path, start_ranks):
    start_ranks(_eager_worker, (str(tmp_path / "store"), str(tmp_path)), 4)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for res in results:
        assert all(res[("bitwise", p)] for p in ("ulysses4", "usp2x2", "cfg2-ulysses2")), res
        assert all(res[("hides", p)] for p in ("ulysses4", "usp2x2", "cfg2-ulysses2"))
        plants = res[("plants", "cfg2-ulysses2")]
        print(f"\nplants (max abs diff with overlap on, off unchanged): {plants}")
        for name, (err, off_unchanged) in plants.items():
            assert err > 1e-3 and off_unchanged, (name, err, off_unchanged)


# --- under inductor ---------------------------------------------------------------------------------------------
# Lines of inductor's generated CPU code: a GEMM (an extern addmm/mm, or mkldnn's linear), a collective, its wait.
CODE = (("gemm", r"(extern_kernels\.(addmm|mm|bmm)|torch\.ops\.mkldnn\._linear|torch\.ops\.mkl\._mkl_linear)\("),
        ("a2a", r"torch\.ops\._c10d_functional\.all_to_all_single\.default\("),
        ("wait", r"torch\.ops\._c10d_functional\.wait_tensor\.default\("))


def code_order(code: str) -> list[str]:
    order = []
    for line in code.splitlines():
        for name, pattern in CODE:
            if re.search(pattern, line):
                order.append(name)
    return order


def graph_order(graph: torch.fx.Graph) -> list[str]:
    """The same kinds of node in an FX graph of aten ops (inductor's post-grad graph)."""
    kinds = {torch.ops.aten.addmm.default: "gemm", torch.ops.aten.mm.default: "gemm",
             torch.ops._c10d_functional.all_to_all_single.default: "a2a",
             torch.ops._c10d_functional.wait_tensor.default: "wait"}
    return [kinds[n.target] for n in graph.nodes if n.op == "call_function" and n.target in kinds]


def hides_under_first_and_last(order: list[str]) -> bool:
    """A GEMM between the first all-to-all and the first wait, and between the last all-to-all and the next wait."""
    if order.count("a2a") < 2:
        return False
    first, last = order.index("a2a"), len(order) - 1 - order[::-1].index("a2a")
    return "gemm" in order[first:order.index("wait", first)] and "gemm" in order[last:order.index("wait", last)]


def _compiled_worker(rank: int, store: str, out_dir: str):
    """ulysses2 (2 head pieces), the single-stream blocks compiled by inductor (the double-stream blocks have no
    work to hand over; compiling them too would double the test's time and test nothing more)."""
    torch.set_num_threads(1)
    from torch._inductor.fx_passes.post_grad import reorder_for_locality
    from torch._inductor.utils import run_and_get_code

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = _wrapped("ulysses2")
    for block in model.inner.single_blocks:
        block.compile(dynamic=False)
    inputs = _inputs(model.inner)
    graphs = {"product": [], "plant": []}

    def record(graph: torch.fx.Graph) -> None:
        # Inductor's post-grad graph as the product config leaves it, and after the pass that config turns off
        # with overlap on (the plant, run on a copy: it moves each GEMM right before linear2, its consumer).
        graphs["product"].append(graph_order(graph))
        copy = torch.fx.Graph()
        copy.output(copy.graph_copy(graph, {}))
        reorder_for_locality(copy)
        graphs["plant"].append(graph_order(copy))

    off, off_codes = run_and_get_code(_forward, model, inputs, False)
    with torch._inductor.config.patch(post_grad_custom_pre_pass=record, fx_graph_cache=False):
        on, on_codes = run_and_get_code(_forward, model, inputs, True)
    results = {"bitwise": torch.equal(on, off), "on": [code_order(c) for c in on_codes],
               "off": [code_order(c) for c in off_codes], **graphs}
    torch._dynamo.reset()
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "compiled.pt"))
    dist.destroy_process_group()


def test_compiled_overlap_is_bitwise_and_hides_the_transfers(tmp_path, start_ranks):
    start_ranks(_compiled_worker, (str(tmp_path / "store"), str(tmp_path)), 2)
    res = torch.load(tmp_path / "compiled.pt")
    print(f"\ncompiled, overlap on: {res['on']}\noff: {res['off']}\npost-grad graph, with inductor's locality pass "
          f"(the plant): {res['plant']}")
    assert res["bitwise"]
    for kind, hides in (("on", True), ("product", True), ("off", False), ("plant", False)):
        # One graph for both single-stream blocks (more if dynamo compiled each block apart: each is checked). The
        # check can fail: the fused block (overlap off) has no GEMM under a transfer, nor has the planted graph.
        assert res[kind] and all(hides_under_first_and_last(o) == hides for o in res[kind]), (kind, res[kind])
