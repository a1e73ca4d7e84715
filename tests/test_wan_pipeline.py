"""Wan 2.2 engine pipelines against diffusers' on the tiny zoo, fp32 CPU, one run each: A14B with CFG and
guidance_scale_2 over 3 steps (the switch to transformer_2 at the third), TI2V-5B image-conditioned. Every recorded
tensor and the decoded frames are bitwise equal; the single step of each expert too (issue 11's floors, cosine
>= 0.99999 single-step and >= 0.9999 final, are implied and asserted as such)."""
import numpy as np
import pytest
import torch

import engine.pipelines.wan as wpipe
import reference.wan as wref
from engine.api import RunConfig, guided_inputs, open_runner
from harness import metrics as M
from harness.zoo import cached_build
from reference.registry import open_runner as open_reference

RUNS = {
    "wan": dict(height=32, width=32, sampling=wpipe.WanSampling(guidance_scale=4.0, guidance_scale_2=3.0,
                                                                      negative_prompt="blurry", num_frames=5,
                                                                      max_sequence_length=16)),
    "wan-ti2v": dict(height=64, width=64, sampling=wpipe.WanSampling(guidance_scale=4.0, negative_prompt="blurry",
                                                                      num_frames=5, max_sequence_length=16,
                                                                      image=True)),
}


@pytest.fixture(scope="module")
def runs(zoo_root, one_thread):
    out = {}
    for family, kw in RUNS.items():
        cfg = RunConfig(family=family, model_dir=str(cached_build(family, "tiny", 0, root=zoo_root)),
                        prompts=("a red fox running through snow",), steps=3, **kw)
        engine, reference = open_runner(cfg), open_reference(cfg)
        out[family] = (cfg, engine, reference, engine.generate(cfg), reference.generate(cfg))
    return out


@pytest.mark.parametrize("family", RUNS)
def test_pipeline_matches_diffusers_bitwise(runs, family):
    _, _, _, got, want = runs[family]
    for field in ("initial_latents", "step_latents", "step_outputs", "final_latents"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.shape == b.shape and torch.equal(a, b), (field, (a - b).abs().max())
    assert M.cosine(got.final_latents.flatten(1), want.final_latents.flatten(1)).min() >= 0.9999
    assert got.images.shape == want.images.shape == (1, 5, RUNS[family]["height"], RUNS[family]["width"], 3)
    assert np.array_equal(got.images, want.images)
    assert set(got.step0_inputs) == set(want.step0_inputs)
    for key in want.step0_inputs:
        assert torch.equal(got.step0_inputs[key], want.step0_inputs[key]), key


@pytest.mark.parametrize("family", RUNS)
def test_single_step_of_each_expert(runs, family):
    """The guided prediction of the first step each expert ran, on the reference's recorded inputs."""
    _, engine, reference, _, _ = runs[family]
    calls = reference.last_calls
    experts = sorted({idx for idx, _, _ in calls})
    assert experts == ([0, 1] if family == "wan" else [0])  # A14B: the switch is inside the run
    for expert in experts:
        i = next(i for i, c in enumerate(calls) if c[0] == expert)
        scale = RUNS[family]["sampling"].guidance_scale if expert == 0 else RUNS[family]["sampling"].guidance_scale_2
        inputs = guided_inputs(calls[i][1], calls[i + 1][1], scale)
        inputs[wpipe.DENOISER] = torch.tensor(expert)
        got, want = engine.transformer_forward(inputs), reference.transformer_forward(inputs)
        assert M.cosine(got.flatten(1), want.flatten(1)).min() >= 0.99999
        assert torch.equal(got, want), (expert, (got - want).abs().max())


def test_ti2v_image_conditioning(runs):
    """The first latent frame is the condition (in the final latents and every model input), its tokens' timestep
    0, the other tokens' the schedule's."""
    _, engine, reference, got, _ = runs["wan-ti2v"]
    step0 = got.step0_inputs
    first = 4 * 4 // 4  # a 4x4 latent frame is 2x2 = 4 patch tokens
    assert (step0["timestep"][:, :first] == 0).all() and (step0["timestep"][:, first:] == 999).all()
    condition = engine.image_condition(1, 64, 64)
    frame = 4 * 4
    assert torch.equal(got.final_latents[:, :frame], wpipe.pack(condition).float())
    assert torch.equal(wpipe.pack(step0["hidden_states"])[:, :frame], wpipe.pack(condition))


def test_reference_copies_of_helpers_agree():
    assert np.array_equal(np.asarray(wpipe.condition_image()), np.asarray(wref.condition_image()))
    x = torch.randn(2, 3, 2, 4, 4)
    assert torch.equal(wpipe.pack(x), wref.pack(x)) and torch.equal(wpipe.unpack(wpipe.pack(x), (2, 4, 4)), x)


def test_bad_sampling_is_a_clear_error(runs):
    cfg, engine, _, _, _ = runs["wan"]
    with pytest.raises(ValueError, match="4k \\+ 1"):
        wpipe.WanSampling(num_frames=6)
    with pytest.raises(ValueError, match="TI2V"):
        engine.generate(cfg.replace(sampling=wpipe.WanSampling(image=True)))
    ti2v_cfg, ti2v, _, _, _ = runs["wan-ti2v"]
    with pytest.raises(ValueError, match="guidance_scale_2"):
        ti2v.generate(ti2v_cfg.replace(sampling=wpipe.WanSampling(guidance_scale_2=2.0)))
