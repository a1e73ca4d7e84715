"""Wan sequence and CFG parallelism end to end, in one launch of 2 gloo processes: the whole A14B pipeline (both
experts, CFG with guidance_scale_2, 3 steps, 9 frames of 32x32: 3 latent frames x 4 tokens = 12 video tokens) and
TI2V image-conditioned (per-token timesteps sharded with their tokens) over ulysses2, ring2 and cfg2 (A14B) and
ring2 (TI2V), against one device, fp32. The text stays whole on every rank (cross-attention keys are never sharded).
Issue 11 requires final-latent cosine >= 0.999999 for ulysses2 and ring2. Measured (CPU, gloo, torch 2.14.1):
ulysses2 and cfg2 bitwise equal to one device (max |diff| 0); ring2 (partials merged by log-sum-exp in fp32)
final-latent cosine 1 - 4e-14 (A14B) and 1 - 1.6e-13 (TI2V), max |diff| 1.7e-6 and 4.8e-6."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

PROMPT = ("a red fox running through snow",)
# TI2V adds what A14B lacks (per-token timesteps cut with their tokens) on the ring path, the one that merges
# partial attentions; Ulysses and cfg2 reach the same wrapper code through A14B.
JOBS = {"wan": ("ulysses2", "ring2", "cfg2"), "wan-ti2v": ("ring2",)}
RUNS = {"wan": dict(height=32, width=32, num_frames=9, guidance_scale_2=3.0, image=False),
        "wan-ti2v": dict(height=64, width=64, num_frames=5, guidance_scale_2=None, image=True)}


def _cfg(family: str, model_dir: str, parallel: str = "sp1"):
    from engine.api import RunConfig
    from engine.pipelines.wan import WanSampling

    kw = dict(RUNS[family])
    height, width = kw.pop("height"), kw.pop("width")
    return RunConfig(family=family, model_dir=model_dir, prompts=PROMPT, seed=3, steps=3, height=height, width=width,
                     sampling=WanSampling(guidance_scale=4.0, negative_prompt="blurry", max_sequence_length=16, **kw),
                     parallel=parallel)


def _worker(rank: int, tmp: str, dirs: dict):
    torch.set_num_threads(1)
    from engine.runner import open_runner

    for i, (family, parallel) in enumerate((f, p) for f in RUNS for p in JOBS[f]):
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store{i}", rank=rank, world_size=2)
        try:
            cfg = _cfg(family, dirs[family], parallel)
            art = open_runner(cfg).generate(cfg)
        finally:
            dist.destroy_process_group()
        torch.save({"final": art.final_latents, "steps": art.step_outputs}, f"{tmp}/{family}.{parallel}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory, zoo_root, start_ranks):
    from harness.zoo import cached_build

    from engine.runner import open_runner

    dirs = {f: str(cached_build(f, "tiny", seed=0, root=zoo_root)) for f in RUNS}
    tmp = tmp_path_factory.mktemp("wan_parallel")
    start_ranks(_worker, (str(tmp), dirs), 2)
    torch.set_num_threads(1)
    single = {f: open_runner(_cfg(f, dirs[f])).generate(_cfg(f, dirs[f])) for f in RUNS}
    runs = {(f, p): [torch.load(tmp / f"{f}.{p}.rank{r}.pt") for r in range(2)] for f in RUNS for p in JOBS[f]}
    return runs, single


def _cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("family,parallel", [(f, p) for f in RUNS for p in JOBS[f]])
def test_parallel_matches_one_device(results, family, parallel):
    runs, single = results
    rank0, rank1 = runs[(family, parallel)]
    assert torch.equal(rank0["final"], rank1["final"]), "ranks disagree"
    cos = min(_cosine(a, b) for a, b in zip(rank0["final"], single[family].final_latents))
    steps = min(_cosine(a, b) for a, b in zip(rank0["steps"], single[family].step_outputs))
    diff = (rank0["final"] - single[family].final_latents).abs().max().item()
    print(f"{family} {parallel} fp32: final-latent cosine {cos!r}, step-output cosine min {steps!r}, "
          f"max |diff| {diff:.3g}")
    assert cos >= 0.999999 and steps >= 0.999999, (cos, steps, diff)


def test_ulysses_degree_must_divide_the_heads():
    from engine.loading import load_model
    from engine.models import wan as W
    from engine.pipelines.wan import WanParallel
    from harness.zoo import synthesize_transformer_state_dict, transformer_config

    cfg = W.WanConfig.from_diffusers(transformer_config("wan", "tiny"))
    model = load_model(lambda: W.WanTransformer(cfg), W.diffusers_key_map(cfg),
                       synthesize_transformer_state_dict("wan", "tiny"), torch.float32, "cpu")
    mesh = SimpleNamespace(sp=SimpleNamespace(size=3), ulysses=SimpleNamespace(size=3))
    with pytest.raises(ValueError, match="Ulysses degree 3 must divide Wan's 4 attention heads"):
        WanParallel(model, mesh)
