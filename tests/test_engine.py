"""The engine's FLUX.1 against diffusers' own components, piece by piece, on the tiny zoo."""
import dataclasses

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from engine.api import RunConfig
from engine.loading import CheckpointError, load_model, read_checkpoint
from engine.models.flux1 import Flux1Config, Flux1Transformer, diffusers_key_map
from engine.pipelines.flux1 import FluxSampling
from engine.runner import open_runner
from engine.sampling.flow_match import euler_step, dynamic_shift_sigmas, shift_mu
from harness.metrics import cosine
from reference.flux1 import Flux1Reference


def _cfg(model_dir, **kw):
    base = dict(family="flux1", model_dir=str(model_dir), prompts=("a red fox in snow", "a lighthouse at dusk"),
                seed=3, steps=3, height=64, width=64, dtype="fp32")
    return RunConfig(**{**base, **kw})


def _inputs(dtype, batch=2, hw=(9, 7), txt=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, txt, 64, generator=g).to(dtype),
        timestep=torch.tensor([0.83] * batch).to(dtype), pooled_projections=torch.randn(batch, 32, generator=g).to(dtype),
        img_ids=ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(txt, 3).to(dtype), guidance=torch.full([batch], 3.5),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_matches_diffusers_bitwise(tiny_flux_dir, dtype):
    """Same weights, same inputs: fused QKV and our block layout must not change a single bit on CPU."""
    ref = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer", dtype=dtype).eval()
    cfg = Flux1Config.from_diffusers(dict(ref.config))
    ours = load_model(lambda: Flux1Transformer(cfg), diffusers_key_map(cfg),
                      read_checkpoint(tiny_flux_dir / "transformer"), dtype, "cpu")
    x = _inputs(dtype)
    with torch.no_grad():
        want = ref(**x, return_dict=False)[0]
        got = ours(x["hidden_states"], x["encoder_hidden_states"], x["timestep"], x["pooled_projections"],
                   x["img_ids"], x["txt_ids"], x["guidance"])
    assert torch.equal(got, want), (got - want).abs().max()


def test_loading_rejects_a_checkpoint_that_does_not_match(tiny_flux_dir):
    ckpt = read_checkpoint(tiny_flux_dir / "transformer")
    cfg = Flux1Config.from_diffusers({**FluxTransformer2DModel.load_config(tiny_flux_dir / "transformer")})
    ckpt.pop("proj_out.bias")
    with pytest.raises(CheckpointError, match="missing keys.*proj_out.bias"):
        load_model(lambda: Flux1Transformer(cfg), diffusers_key_map(cfg), ckpt, torch.float32, "cpu")
    ckpt["proj_out.bias"] = torch.zeros(16)
    ckpt["stray.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys.*stray.weight"):
        load_model(lambda: Flux1Transformer(cfg), diffusers_key_map(cfg), ckpt, torch.float32, "cpu")


@pytest.mark.parametrize("steps,seq_len", [(4, 256), (28, 4096), (1, 81), (50, 1024)])
def test_sigmas_match_diffusers_scheduler(steps, seq_len):
    config = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                  num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(seq_len, config))
    assert torch.equal(dynamic_shift_sigmas(steps, seq_len, config), sched.sigmas)


def test_euler_step_matches_diffusers_in_bf16():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=0.7)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 9, 16, generator=g).bfloat16(), torch.randn(2, 9, 16, generator=g).bfloat16()
    want = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    assert torch.equal(euler_step(x, v, sched.sigmas[0], sched.sigmas[1]), want)


def test_unsupported_scheduler_option_is_an_error():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        dynamic_shift_sigmas(4, 256, {"use_karras_sigmas": True})


def test_pipeline_matches_reference_fp32(tiny_flux_dir):
    """Whole pipeline: same noise, same schedule, near-identical final latents and images."""
    cfg = _cfg(tiny_flux_dir)
    ref = Flux1Reference(cfg).generate(cfg)
    ours = open_runner(cfg).generate(cfg)
    assert torch.equal(ours.initial_latents, ref.initial_latents)
    assert cosine(ours.final_latents, ref.final_latents).min() >= 0.9999
    assert ours.images.shape == ref.images.shape == (2, 1, 64, 64, 3)  # (B, F, H, W, 3)
    assert np.abs(ours.images.astype(int) - ref.images.astype(int)).max() <= 2


def test_true_cfg_matches_reference(tiny_flux_dir):
    cfg = _cfg(tiny_flux_dir, sampling=FluxSampling(negative_prompt="blurry, low quality", true_cfg_scale=3.0), steps=2)
    ref = Flux1Reference(cfg).generate(cfg)
    ours = open_runner(cfg).generate(cfg)
    assert cosine(ours.step_outputs[0], ref.step_outputs[0]).min() >= 0.9999
    assert cosine(ours.final_latents, ref.final_latents).min() >= 0.9999
    plain = open_runner(cfg).generate(cfg.replace(sampling=dataclasses.replace(cfg.sampling, true_cfg_scale=1.0)))
    assert cosine(plain.step_outputs[0], ours.step_outputs[0]).min() < 0.9999, "CFG had no effect"


def test_single_step_of_a_cfg_run_is_the_guided_prediction(tiny_flux_dir):
    """Issue 16: with true CFG the step-0 inputs carry both branches and the scale; one step on them (reference and
    engine) is the guided prediction of step 0, not the conditional branch alone."""
    cfg = _cfg(tiny_flux_dir, sampling=FluxSampling(negative_prompt="blurry, low quality", true_cfg_scale=3.0), steps=2)
    reference = Flux1Reference(cfg)
    ref = reference.generate(cfg)
    ref_step = reference.transformer_forward(ref.step0_inputs)
    assert torch.equal(ref_step.float(), ref.step_outputs[0])
    runner = open_runner(cfg)
    ours = runner.generate(cfg)
    assert any(k.startswith("negative.") for k in ours.step0_inputs)
    assert torch.equal(runner.transformer_forward(ours.step0_inputs).float(), ours.step_outputs[0])
    assert cosine(runner.transformer_forward(ref.step0_inputs), ref_step).min() >= 0.9999
    cond_only = {k: v for k, v in ref.step0_inputs.items() if not k.startswith(("negative.", "guided."))}
    assert cosine(reference.transformer_forward(cond_only), ref_step).max() < 0.999


def test_open_runner_rejects_unknown_names(tiny_flux_dir):
    with pytest.raises(ValueError, match="valid: \\[.*'flux1'"):
        open_runner(_cfg(tiny_flux_dir, family="sd3"))
    with pytest.raises(ValueError, match="unknown dtype 'fp64'"):
        _cfg(tiny_flux_dir, dtype="fp64")
