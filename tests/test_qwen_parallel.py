"""Qwen-Image sequence parallelism at the transformer: Ulysses and ring over 2 gloo ranks and USP 2x2 over 4, against
one device, on an Edit-shaped image sequence (the generated image's 4x6 tokens, then a 7x5 condition image on frame
1: 59 tokens, so the shards are uneven and the cut falls inside the generated image) with a padded text batch (key
mask). A planted RoPE shard offset, installed from this test only, must break it.

Measured (CPU, gloo, torch 2.14.1): fp32 Ulysses is bitwise equal to one device; fp32 ring (partials merged by
log-sum-exp) max |diff| 7e-7, cosine 1 - 1.4e-14; bf16 (the linears run on half the rows, which rounds
differently) cosine 0.99998 for both. The planted offset: cosine 0.99957."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

SHAPES = [(1, 4, 6), (1, 7, 5)]
# (parallel, dtype, plant) -> the ranks of a 4-process world it runs on; jobs on disjoint ranks run side by side.
JOBS = {("usp2x2", "fp32", None): (0, 1, 2, 3)}
for i, dtype in enumerate(("fp32", "bf16")):
    for j, plant in enumerate((None, "rope")):
        JOBS[("ulysses2", dtype, plant)] = (0, 1)
        JOBS[("ring2", dtype, plant)] = (2, 3)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _model(dtype):
    from engine.loading import load_model
    from engine.models import qwen_image as Q
    from harness.zoo import synthesize_transformer_state_dict, transformer_config

    cfg = Q.QwenImageConfig.from_diffusers(transformer_config("qwen-image", "tiny"))
    return load_model(lambda: Q.QwenImageTransformer(cfg), Q.diffusers_key_map(cfg),
                      synthesize_transformer_state_dict("qwen-image", "tiny"), dtype, "cpu").eval()


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    n = sum(f * h * w for f, h, w in SHAPES)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # the second prompt is shorter: its last tokens are padding
    return (torch.randn(2, n, 16, generator=g).to(dtype), torch.randn(2, 11, 16, generator=g).to(dtype),
            torch.tensor([0.83, 0.83]).to(dtype), SHAPES, mask)


def _worker(proc: int, tmp: str):
    torch.set_num_threads(1)  # 4 processes on 2 cores
    import engine.parallel.transformer as T
    from engine.parallel.config import parse_parallel
    from engine.parallel.mesh import get_mesh
    from engine.pipelines.qwen_image import QwenImageParallel

    shard_positions = T.shard_positions
    for i, ((parallel, dtype, plant), ranks) in enumerate(JOBS.items()):
        if proc not in ranks:
            continue
        rank = ranks.index(proc)
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store{i}", rank=rank, world_size=len(ranks))
        # The plant: each shard's RoPE rows one token early (rolled before the cut), product code unaware.
        T.shard_positions = (shard_positions if plant is None else
                             lambda plan, ids, dim, index: shard_positions(plan, ids.roll(1, dims=dim), dim, index))
        try:
            model = QwenImageParallel(_model(DTYPES[dtype]), get_mesh(parse_parallel(parallel)))
            with torch.no_grad():
                out = model(*_inputs(DTYPES[dtype]))
        finally:
            T.shard_positions = shard_positions
        torch.save(out, f"{tmp}/{i}.rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory, start_ranks):
    tmp = tmp_path_factory.mktemp("qwen_parallel")
    start_ranks(_worker, (str(tmp),), 4)
    torch.set_num_threads(1)
    with torch.no_grad():
        single = {d: _model(DTYPES[d])(*_inputs(DTYPES[d])) for d in DTYPES}
    return {job: ([torch.load(tmp / f"{i}.rank{r}.pt") for r in range(len(ranks))], single[job[1]])
            for i, (job, ranks) in enumerate(JOBS.items())}


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("parallel,dtype", [("ulysses2", "fp32"), ("ulysses2", "bf16"), ("ring2", "fp32"),
                                            ("ring2", "bf16"), ("usp2x2", "fp32")])
def test_sequence_parallel_matches_one_device(results, parallel, dtype):
    (rank0, *others), single = results[(parallel, dtype, None)]
    assert all(torch.equal(rank0, other) for other in others), "ranks disagree"
    diff, cos = (rank0.float() - single.float()).abs().max().item(), _cosine(rank0, single)
    print(f"{parallel} {dtype}: max |diff| {diff:.3g}, cosine {cos!r}")
    if (parallel, dtype) == ("ulysses2", "fp32"):
        assert torch.equal(rank0, single), diff  # the model's own kernels on the whole sequence, per head
    else:
        assert cos >= (0.999999 if dtype == "fp32" else 0.9999), diff


@pytest.mark.parametrize("parallel", ["ulysses2", "ring2"])
def test_planted_rope_shard_offset_is_caught(results, parallel):
    (rank0, _), single = results[(parallel, "fp32", "rope")]
    cos = _cosine(rank0, single)
    print(f"{parallel} fp32 with the RoPE shard offset: cosine {cos!r}")
    # Measured 0.99957: 400x the distance from 1 that the fp32 parallel floor (0.999999) allows.
    assert cos < 0.9999, "a RoPE shard offset went unnoticed"


def test_ulysses_degree_must_divide_the_heads():
    from engine.pipelines.qwen_image import QwenImageParallel

    mesh = SimpleNamespace(sp=SimpleNamespace(size=3), ulysses=SimpleNamespace(size=3))
    with pytest.raises(ValueError, match="Ulysses degree 3 must divide Qwen-Image's 4 attention heads"):
        QwenImageParallel(_model(torch.float32), mesh)
