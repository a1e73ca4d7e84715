"""Ideogram 4 over 2 gloo ranks, one launch for all three schemes (sequentially, the same 2 processes): Ulysses-2 and
ring-2 (the [left-pad | text] region replicated, the image tokens sharded, padding keys masked) and CFG-parallel
(the conditional transformer on rank 0, the unconditional one on rank 1), each against one device, fp32, the 12-step
preset. The two prompts' texts have different lengths, so the conditional sequence carries left padding.

Measured (CPU, gloo, torch 2.14.1): ulysses2 and cfg2 bitwise equal to one device; ring2 (partials merged by
log-sum-exp in fp32) final-latent cosine >= 1 - 1e-12. Gate: 0.999999, as Z-Image's."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

PROMPTS = ("a red fox in deep snow", "a lighthouse on a rock at dusk, oil painting")
SCHEMES = ("ulysses2", "ring2", "cfg2")


def _cfg(model_dir: str, parallel: str = "sp1"):
    from engine.api import RunConfig
    from engine.pipelines.ideogram4 import Ideogram4Sampling

    return RunConfig(family="ideogram4", model_dir=model_dir, prompts=PROMPTS, seed=5, steps=12, height=32, width=48,
                     sampling=Ideogram4Sampling(preset="turbo-12", max_sequence_length=64), parallel=parallel)


def _worker(rank: int, tmp: str, model_dir: str):
    torch.set_num_threads(1)
    import engine.pipelines.ideogram4 as ipipe
    from engine.runner import open_runner

    # Whether generate() hands each wrapped forward its PackedLayout (without one the forward reads it back from
    # the device every step: tests/test_ideogram4_sp_layout.py).
    forward, given = ipipe.Ideogram4Parallel.forward, []

    def recording(self, *args, layout=None):
        given.append(layout is not None)
        return forward(self, *args, layout=layout)
    for i, parallel in enumerate(SCHEMES):
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store{i}", rank=rank, world_size=2)
        try:
            runner = open_runner(_cfg(model_dir, parallel))
            given.clear()
            ipipe.Ideogram4Parallel.forward = recording
            try:
                art = runner.generate(_cfg(model_dir, parallel))
            finally:
                ipipe.Ideogram4Parallel.forward = forward
            single = runner.transformer_forward(art.step0_inputs)
        finally:
            dist.destroy_process_group()
        torch.save({"final": art.final_latents, "steps": art.step_outputs, "single": single,
                    "layout_given": list(given)}, f"{tmp}/{parallel}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory, zoo_root, start_ranks):
    from harness.zoo import cached_build

    from engine.runner import open_runner

    model_dir = str(cached_build("ideogram4", "tiny", seed=0, root=zoo_root))
    tmp = tmp_path_factory.mktemp("ideogram4_parallel")
    start_ranks(_worker, (str(tmp), model_dir), 2)
    torch.set_num_threads(1)
    runner = open_runner(_cfg(model_dir))
    single = runner.generate(_cfg(model_dir))
    single.extras["single"] = runner.transformer_forward(single.step0_inputs)
    return {p: [torch.load(tmp / f"{p}.rank{r}.pt") for r in range(2)] for p in SCHEMES}, single


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("parallel", SCHEMES)
def test_parallel_matches_one_device(results, parallel):
    runs, single = results
    rank0, rank1 = runs[parallel]
    assert torch.equal(rank0["final"], rank1["final"]), "ranks disagree"
    for rank in (rank0, rank1):  # every wrapped forward of generate() got its layout
        assert rank["layout_given"] and all(rank["layout_given"]), rank["layout_given"]
    assert single.step0_inputs["indicator"].eq(-0).any()  # left padding in the conditional sequence
    cos = min(_cosine(a, b) for a, b in zip(rank0["final"], single.final_latents))
    steps = min(_cosine(a, b) for a, b in zip(rank0["steps"], single.step_outputs))
    one = _cosine(rank0["single"], single.extras["single"])
    diff = (rank0["final"] - single.final_latents).abs().max().item()
    print(f"{parallel} fp32: final-latent cosine {cos!r}, step-output cosine min {steps!r}, single step {one!r}, "
          f"max |diff| {diff:.3g}")
    assert cos >= 0.999999 and steps >= 0.999999 and one >= 0.999999, (cos, steps, one, diff)


def test_ulysses_degree_must_divide_the_heads():
    from types import SimpleNamespace

    from engine.pipelines.ideogram4 import Ideogram4Parallel, denoiser_builder
    from harness.zoo import transformer_config

    build, _ = denoiser_builder("transformer", transformer_config("ideogram4", "tiny"))
    with torch.device("meta"):
        model = build()
    mesh = SimpleNamespace(sp=SimpleNamespace(size=3), ulysses=SimpleNamespace(size=3))
    with pytest.raises(ValueError, match="Ulysses degree 3 must divide Ideogram 4's 4 attention heads"):
        Ideogram4Parallel(model, mesh)
