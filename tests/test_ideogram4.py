"""Ideogram 4 on the tiny zoo, CPU, against diffusers 0.42.1 (issue 12's "Must show"):
  - each transformer (conditional on a padded packed batch, unconditional on image tokens) vs
    Ideogram4Transformer2DModel: single-step cosine >= 0.99999; measured bitwise equal in fp32 and bf16, asserted so;
  - the logit-normal schedule vs the formula evaluated here by hand (math / statistics, float64) for every preset at
    two resolutions: max abs difference <= 1e-12 before the float32 cast;
  - the whole pipeline vs the stock Ideogram4Pipeline for the 12-step (turbo) and 20-step (default) presets at their
    own step counts: final latents cosine >= 0.9999; measured bitwise equal in fp32, asserted so.
One engine runner and one reference runner are shared by the module (two prompts of different lengths, so the
conditional batch carries left padding)."""
import math
import statistics

import pytest
import torch
from diffusers import Ideogram4Transformer2DModel

import engine.pipelines.ideogram4 as ipipe
import reference.ideogram4 as iref
from engine.api import RunConfig
from engine.loading import load_model, read_checkpoint
from engine.models import ideogram4 as I
from engine.runner import open_runner
from engine.sampling import logit_normal as LN
from harness import metrics as M

PROMPTS = ("a photo of a cat", "a lighthouse on a cliff at dusk, oil painting")
SIZE = dict(height=32, width=48)  # 8x12 tokens of the tiny VAE (x2) and patches (x2)


@pytest.fixture(scope="module")
def tiny_dir(zoo_root):
    from harness.zoo import cached_build

    return cached_build("ideogram4", "tiny", seed=0, root=zoo_root)


def _cfg(tiny_dir, preset: str, **kw) -> RunConfig:
    return RunConfig(family="ideogram4", model_dir=str(tiny_dir), prompts=PROMPTS, seed=5,
                     steps=ipipe.preset(preset).steps,
                     sampling=ipipe.Ideogram4Sampling(preset=preset, max_sequence_length=64), **SIZE, **kw)


@pytest.fixture(scope="module")
def runners(tiny_dir):
    cfg = _cfg(tiny_dir, "turbo-12")
    return open_runner(cfg), iref.Ideogram4Reference(cfg)


def _models(folder, name, dtype):
    ref = Ideogram4Transformer2DModel.from_pretrained(folder / name, dtype=dtype).eval()
    cfg = I.Ideogram4Config.from_diffusers(dict(ref.config))
    ours = load_model(lambda: I.Ideogram4Transformer(cfg), I.diffusers_key_map(cfg), read_checkpoint(folder / name),
                      dtype, "cpu")
    return ref, ours


def _packed_inputs(dtype, seed=0, text=(7, 12), max_text=12, grid=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    pos, seg, ind = ipipe.packed_ids(list(text), grid, max_text)
    b, total = seg.shape
    x = torch.randn(b, total, 16, generator=g) * (ind == 2)[..., None]
    e = torch.randn(b, total, 96, generator=g) * (ind == 3)[..., None]
    return dict(hidden_states=x.to(dtype), timestep=torch.tensor([0.3, 0.7]).to(dtype),
                encoder_hidden_states=e.to(dtype), position_ids=pos, segment_ids=seg, indicator=ind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["transformer", "unconditional_transformer"])
def test_transformer_matches_diffusers(tiny_dir, name, dtype, one_thread):
    ref, ours = _models(tiny_dir, name, dtype)
    inputs = _packed_inputs(dtype)
    if name == "unconditional_transformer":
        inputs = ipipe.unconditional_inputs(inputs, 12)
    with torch.no_grad():
        want = ref(**inputs, return_dict=False)[0]
        got = ipipe.denoiser_forward(ours, inputs)
    image = inputs["indicator"] == 2  # padding tokens' outputs are not predictions (see engine/models/ideogram4.py)
    got, want = got[image], want[image]
    assert M.cosine(got.flatten()[None], want.flatten()[None])[0] >= 0.99999
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_mrope_ignores_bf16_autocast_and_image_positions_matter():
    """Image positions sit above 65536, where bf16 steps by 512: the angles must not change under bf16 autocast,
    and rounding the positions to bf16 (the bug the reference guards against) must change them."""
    pos, _, _ = ipipe.packed_ids([5], (8, 8), 5)
    cfg = I.Ideogram4Config.from_diffusers(dict(attention_head_dim=8, num_attention_heads=4, mrope_section=(2, 1, 1),
                                                rope_theta=10000))
    plain = I.mrope_angles(pos, 8, cfg.rope_theta, cfg.mrope_section)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = I.mrope_angles(pos, 8, cfg.rope_theta, cfg.mrope_section)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    rounded = I.mrope_angles(pos.to(torch.bfloat16).long(), 8, cfg.rope_theta, cfg.mrope_section)
    assert not torch.equal(rounded, plain)
    # Interleaving: frequency 1 reads the h axis, 2 the w axis, 0 and 3 the t axis (section (2, 1, 1)).
    assert plain[0, 5 + 9, 1] != plain[0, 5 + 1, 1] and plain[0, 5 + 9, 0] == plain[0, 5 + 1, 0]


def test_segment_ids_refuse_packed_samples():
    with pytest.raises(ValueError, match="one sample per row"):
        I.segment_key_mask(torch.tensor([[-1, 1, 1, 2, 2]]))
    assert I.segment_key_mask(torch.tensor([[1, 1, 1]])) is None
    assert I.segment_key_mask(torch.tensor([[-1, 1, 1]])).tolist() == [[False, True, True]]


def _hand_sigmas(steps: int, mu: float, std: float, height: int, width: int) -> list[float]:
    """The ANCHORS section 3 formula, evaluated with the standard library in float64."""
    mu_eff = mu + 0.5 * math.log(height * width / 512 ** 2)
    t_min, t_max = 1 / (1 + math.exp(0.5 * 18)), 1 / (1 + math.exp(0.5 * -15))
    out = []
    for j in range(steps + 1):
        s = j / steps
        z = -math.inf if s == 0 else math.inf if s == 1 else statistics.NormalDist().inv_cdf(s)
        y = mu_eff + std * z
        t = 1 - (1 / (1 + math.exp(-y)) if math.isfinite(y) else (0.0 if y < 0 else 1.0))
        out.append(1 - min(max(t, t_min), t_max))
    return out[::-1][:-1]


@pytest.mark.parametrize("name", sorted(ipipe.PRESETS))
@pytest.mark.parametrize("size", [(1024, 1024), (768, 1344)])
def test_schedule_matches_the_formula_in_float64(name, size):
    p = ipipe.preset(name)
    ours = LN.logit_normal_sigmas64(p.steps, LN.resolution_mu(p.mu, *size), p.std)
    hand = torch.tensor(_hand_sigmas(p.steps, p.mu, p.std, *size), dtype=torch.float64)
    assert ours.dtype == torch.float64 and ours.shape == (p.steps,)
    assert (ours - hand).abs().max() <= 1e-12
    # The infinite quantile lands on the logSNR clamp: the first level is 1 - t_min.
    assert ours[0] == 1 - 1 / (1 + math.exp(9))
    f32 = LN.logit_normal_sigmas(p.steps, p.mu, p.std, *size)
    assert f32.dtype == torch.float32 and f32[-1] == 0 and torch.equal(f32[:-1], ours.float())


def test_presets_and_guidance_schedule():
    assert {k: (p.steps, p.mu, p.std, p.polish_steps) for k, p in ipipe.PRESETS.items()} == {
        "quality-48": (48, 0.0, 1.5, 3), "default-20": (20, 0.0, 1.75, 2), "turbo-12": (12, 0.5, 1.75, 1)}
    assert ipipe.preset("quality-48").guidance() == (7.0,) * 45 + (3.0,) * 3  # diffusers' default guidance_schedule
    assert ipipe.Ideogram4Sampling(preset="turbo-12", guidance_scale=4.0).guidance() == (4.0,) * 12
    for name, p in ipipe.PRESETS.items():  # the reference's own copy agrees
        for scale in (None, 4.0):
            s = ipipe.Ideogram4Sampling(preset=name, guidance_scale=scale)
            assert iref.sampler_settings(s) == (p.mu, p.std, list(s.guidance()))
    with pytest.raises(ValueError, match="valid"):
        ipipe.Ideogram4Sampling(preset="fast")


def test_tap_rule_is_the_release_layers():
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import QWEN3_VL_ACTIVATION_LAYERS

    assert ipipe.tapped_layers(36) == iref.tapped_layers(36) == QWEN3_VL_ACTIVATION_LAYERS
    assert ipipe.tapped_layers(5) == (0, 3, 4)


@pytest.mark.parametrize("preset", ["turbo-12", "default-20"])
def test_pipeline_matches_diffusers_fp32(tiny_dir, runners, preset, one_thread):
    engine, reference = runners
    cfg = _cfg(tiny_dir, preset)
    ref = reference.generate(cfg)
    eng = engine.generate(cfg)
    assert eng.final_latents.shape == ref.final_latents.shape == (2, 96, 16)
    assert ref.step_outputs.shape[0] == cfg.steps
    assert torch.equal(eng.initial_latents, ref.initial_latents)
    assert set(eng.step0_inputs) == set(ref.step0_inputs)
    for k, v in ref.step0_inputs.items():
        assert torch.equal(eng.step0_inputs[k], v), k
    single = engine.transformer_forward(ref.step0_inputs)
    assert M.cosine(single, reference.transformer_forward(ref.step0_inputs)).min() >= 0.99999
    assert M.cosine(eng.final_latents, ref.final_latents).min() >= 0.9999
    # Measured bitwise equal (fp32, CPU): assert it, so any drift is seen.
    assert torch.equal(single, ref.step_outputs[0])
    assert torch.equal(eng.step_outputs, ref.step_outputs) and torch.equal(eng.final_latents, ref.final_latents)
    assert (eng.images == ref.images).all()


def test_steps_must_be_the_presets(tiny_dir, runners):
    with pytest.raises(ValueError, match="has 12 steps"):
        runners[0].generate(_cfg(tiny_dir, "turbo-12").replace(steps=4))
