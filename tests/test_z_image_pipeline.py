"""Z-Image end to end on the tiny zoo, CPU: the engine against the stock diffusers ZImagePipeline (issue 10's
"Must show": single-step cosine >= 0.99999 and final latents >= 0.9999 in fp32, Z-Image with CFG and Z-Image-Turbo
settings), the CFG variants (norm clamp, truncation), and bit for bit on CPU in fp32 and bf16."""
import dataclasses

import numpy as np
import pytest
import torch

from engine.api import RunConfig
from engine.pipelines.z_image import ZImageSampling
from engine.runner import open_runner
from harness import metrics as M
from reference.registry import reference as reference_class

PROMPTS = ("a red fox standing in fresh snow", "a lighthouse on a cliff at dusk, oil painting")
# 32x40 pixels: 16x20 latents, 80 image tokens (+16 x_pad_tokens); the two captions differ in length (a masked batch).
SETTINGS = {
    # Z-Image: CFG against a negative prompt, the norm clamp on, truncation dropping CFG on the last step (3 steps of
    # the shift-3 schedule sit at normalized times 0, 0.143, 0.4: only the last exceeds 0.3).
    "z-image-cfg": dict(steps=3, sampling=ZImageSampling(guidance_scale=4.0, negative_prompt="blurry, low quality",
                                                         cfg_normalization=1.0, cfg_truncation=0.3)),
    # Z-Image-Turbo: few steps, no CFG (guidance_scale 0).
    "turbo": dict(steps=4, sampling=ZImageSampling(guidance_scale=0.0)),
}


@pytest.fixture(scope="module")
def tiny_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("z-image", "tiny", seed=0, root=zoo_root)


def _cfg(tiny_dir, setting, **kw):
    return RunConfig(family="z-image", model_dir=str(tiny_dir), prompts=PROMPTS, seed=3, height=32, width=40,
                     **{**SETTINGS[setting], **kw})


_RUNS: dict = {}


def _pair(cfg):
    """(engine artifacts, reference artifacts); each with its single-step output on the reference's step-0 inputs."""
    if cfg not in _RUNS:
        ref_runner = reference_class(cfg.family)(cfg)
        ref = ref_runner.generate(cfg)
        ref.extras["single_step"] = ref_runner.transformer_forward(ref.step0_inputs)
        runner = open_runner(cfg)
        eng = runner.generate(cfg)
        eng.extras["single_step"] = runner.transformer_forward(ref.step0_inputs)
        _RUNS[cfg] = eng, ref
    return _RUNS[cfg]


@pytest.mark.parametrize("setting", SETTINGS)
def test_fp32_matches_diffusers(tiny_dir, setting, one_thread):
    eng, ref = _pair(_cfg(tiny_dir, setting))
    assert eng.final_latents.shape == ref.final_latents.shape == (2, 80, 64)
    assert torch.equal(eng.initial_latents, ref.initial_latents)
    single = M.cosine(eng.extras["single_step"], ref.extras["single_step"])
    final = M.cosine(eng.final_latents, ref.final_latents)
    assert single.min() >= 0.99999 and final.min() >= 0.9999, (single, final)
    # The reference's recomputed guided velocity is the one its scheduler stepped with.
    assert M.cosine(ref.extras["single_step"], ref.step_outputs[0]).min() >= 1 - 1e-12
    assert np.abs(eng.images.astype(int) - ref.images.astype(int)).max() <= 1


def test_step0_inputs_carry_both_branches_and_the_clamp(tiny_dir, one_thread):
    eng, ref = _pair(_cfg(tiny_dir, "z-image-cfg"))
    assert sorted(eng.step0_inputs) == sorted(ref.step0_inputs)
    assert float(ref.step0_inputs["guided.true_cfg_scale"]) == 4.0
    assert float(ref.step0_inputs["guided.cfg_normalization"]) == 1.0
    for key, value in ref.step0_inputs.items():
        assert torch.equal(eng.step0_inputs[key], value), key
    assert ref.step0_inputs["t"].tolist() == [0.0, 0.0]  # the model's time: 0 at noise


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_bitwise_on_cpu(tiny_dir, setting, dtype, one_thread):
    """Measured: every recorded tensor and the images identical to diffusers on CPU, CFG included (the serial
    engine runs both branches as one batch of 4, as the pipeline does)."""
    eng, ref = _pair(_cfg(tiny_dir, setting, dtype=dtype))
    assert torch.equal(eng.final_latents, ref.final_latents)
    assert torch.equal(eng.step_outputs, ref.step_outputs)
    assert torch.equal(eng.extras["single_step"], ref.extras["single_step"])
    assert np.array_equal(eng.images, ref.images)


def test_cfg_settings_change_the_result(tiny_dir, one_thread):
    """Each CFG knob is live in the engine: without the clamp, without truncation, or with s = 0 the trajectory is
    another one (so the matches above are not vacuous)."""
    eng, _ = _pair(_cfg(tiny_dir, "z-image-cfg"))
    base = _cfg(tiny_dir, "z-image-cfg")
    for change in (dict(cfg_normalization=0.0), dict(cfg_truncation=1.0), dict(guidance_scale=0.0)):
        other = open_runner(base).generate(base.replace(sampling=dataclasses.replace(base.sampling, **change)))
        assert M.cosine(other.final_latents, eng.final_latents).min() < 0.9999, change
