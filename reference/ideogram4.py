"""diffusers Ideogram4Pipeline as a parity backend: the stock pipeline, recorded through hooks only (both transformers'
inputs and outputs, the latents after each step). The guided velocity of each step is recomputed from the recorded
outputs with the pipeline's own formula (g v_pos + (1 - g) v_neg on the image tokens, float32), negated to the
sampler's direction, because the pipeline's step callback does not expose it.

One setting is made for the zoo, not for numerics: diffusers hard-codes the 13 tapped layers of the 36-layer
Qwen3-VL (QWEN3_VL_ACTIVATION_LAYERS); a text encoder of another depth gets the same rule over its own layer count
(every third layer from 0, plus the last), set on the pipeline module for the duration of a call. For 36 layers the
rule gives diffusers' tuple (tests/test_ideogram4.py checks it), so a real checkpoint runs diffusers unchanged.

Latents and velocities are (B, N, C) image tokens; step-0 inputs are both transformers' kwargs under their diffusers
names (engine.api.guided_inputs: the unconditional ones under "negative.", the first step's guidance weight).
"""
from __future__ import annotations

import contextlib
import time
from typing import Mapping

import diffusers
import diffusers.pipelines.ideogram4.pipeline_ideogram4 as ideogram_module
import numpy as np
import torch
from diffusers import Ideogram4Pipeline, Ideogram4Transformer2DModel

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided

KWARGS = ("hidden_states", "timestep", "encoder_hidden_states", "position_ids", "segment_ids", "indicator")


# The reference's own copy of the sampler presets (ideogram-oss/ideogram4 docs/inference.md): steps, mu, std and the
# number of final "polish" steps at guidance 3 after the main steps at 7. tests/test_ideogram4.py checks it against
# the engine's table; keeping a copy means a planted engine bug in the guidance schedule cannot reach the reference.
PRESETS = {"quality-48": (48, 0.0, 1.5, 3), "default-20": (20, 0.0, 1.75, 2), "turbo-12": (12, 0.5, 1.75, 1)}


def sampler_settings(sampling) -> tuple[float, float, list[float]]:
    """(mu, std, per-step guidance weights) for a sampling object's preset and guidance_scale override."""
    steps, mu, std, polish = PRESETS[sampling.preset]
    if sampling.guidance_scale is not None:
        return mu, std, [float(sampling.guidance_scale)] * steps
    return mu, std, [7.0] * (steps - polish) + [3.0] * polish


def tapped_layers(num_layers: int) -> tuple[int, ...]:
    """The reference's copy of the tap rule (it reaches the engine only through engine.api)."""
    return tuple(range(0, num_layers - 1, 3)) + (num_layers - 1,)


@contextlib.contextmanager
def taps_for(num_layers: int):
    saved = ideogram_module.QWEN3_VL_ACTIVATION_LAYERS
    ideogram_module.QWEN3_VL_ACTIVATION_LAYERS = tapped_layers(num_layers)
    try:
        yield
    finally:
        ideogram_module.QWEN3_VL_ACTIVATION_LAYERS = saved


def guide(pos: torch.Tensor, neg: torch.Tensor, weight: float) -> torch.Tensor:
    gw = torch.tensor(weight, dtype=torch.float32)
    return gw * pos.float() + (1.0 - gw) * neg.float()


class BenchIdeogram4Transformer(Ideogram4Transformer2DModel):
    """diffusers' Ideogram4Transformer2DModel as `parity bench` calls it: the output tensor, not the output class.
    The bench builds it on the meta device and assigns synthesized weights, which leaves the MRoPE's non-persistent
    float32 `inv_freq` unmade (or cast to bf16 by a later `.to`); it is made here once, in float32 on the inputs'
    device, exactly as the constructor makes it and as `from_pretrained` leaves it. Numerics otherwise untouched."""

    def forward(self, *args, return_dict: bool = False, **kwargs):
        rope = self.rotary_emb
        if rope.inv_freq.is_meta or rope.inv_freq.dtype != torch.float32:
            device = kwargs["hidden_states"].device
            dim = rope.head_dim
            base = self.config.rope_theta
            rope.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        return super().forward(*args, return_dict=False, **kwargs)


class Ideogram4Reference:
    family = "ideogram4"
    DENOISERS = {"transformer": BenchIdeogram4Transformer, "unconditional_transformer": BenchIdeogram4Transformer}

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        self.model_cfg = cfg
        self.pipe = Ideogram4Pipeline.from_pretrained(cfg.model_dir, dtype=cfg.torch_dtype).to(cfg.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.text_layers = len(self.pipe.text_encoder.language_model.layers)
        self.load_seconds = time.perf_counter() - t0

    def call(self, model, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        device = self.model_cfg.device
        return model(**{k: inputs[k].to(device) for k in KWARGS}, return_dict=False)[0]

    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, negative, weight = split_guided(inputs)
        out = self.call(self.pipe.transformer, cond)
        if negative is None:
            return -out.float()[cond["indicator"].to(out.device) == 2].view(out.shape[0], -1, out.shape[-1])
        max_text = cond["hidden_states"].shape[1] - negative["hidden_states"].shape[1]
        neg = self.call(self.pipe.unconditional_transformer, negative)
        return -guide(out[:, max_text:].float(), neg.float(), weight)

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        s = cfg.sampling
        mu, std, weights = sampler_settings(s)
        pos_calls: list[dict] = []
        neg_calls: list[dict] = []
        step_latents: list[torch.Tensor] = []
        guided: list[torch.Tensor] = []

        def recorder(store):
            def hook(module, args, kwargs, output):
                store.append({**{k: kwargs[k] for k in KWARGS}, "out": output[0]})
            return hook

        def on_step_end(pipe, i, t, tensors):
            step_latents.append(tensors["latents"].detach().float().cpu())
            max_text = pos_calls[-1]["hidden_states"].shape[1] - neg_calls[-1]["hidden_states"].shape[1]
            v = guide(pos_calls[-1]["out"][:, max_text:].float(), neg_calls[-1]["out"].float(), weights[i])
            guided.append(-v.detach().float().cpu())
            # Keep only what step 0 needs: a long run would otherwise hold every step's inputs.
            for store in (pos_calls, neg_calls):
                if len(store) > 1:
                    store[-1] = {"hidden_states": store[-1]["hidden_states"]}
            return {}

        handles = [self.pipe.transformer.register_forward_hook(recorder(pos_calls), with_kwargs=True),
                   self.pipe.unconditional_transformer.register_forward_hook(recorder(neg_calls), with_kwargs=True)]
        try:
            t0 = time.perf_counter()
            with taps_for(self.text_layers):
                result = self.pipe(
                    prompt=list(cfg.prompts), height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
                    guidance_scale=None, guidance_schedule=list(weights), mu=mu, std=std,
                    max_sequence_length=s.max_sequence_length,
                    generator=torch.Generator("cpu").manual_seed(cfg.seed), output_type="np",
                    callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
            seconds = time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()
        cond = {k: pos_calls[0][k].detach().cpu() for k in KWARGS}
        negative = {k: neg_calls[0][k].detach().cpu() for k in KWARGS}
        step0 = guided_inputs(cond, negative, weights[0])
        batch, n = negative["hidden_states"].shape[:2]
        initial = torch.randn(batch, n, cond["hidden_states"].shape[-1],
                              generator=torch.Generator("cpu").manual_seed(cfg.seed), dtype=torch.float32)
        images = (np.asarray(result.images) * 255).round().astype(np.uint8)[:, None]  # (B, F=1, H, W, 3)
        return Artifacts(
            initial_latents=initial, step_latents=torch.stack(step_latents), step_outputs=torch.stack(guided),
            final_latents=step_latents[-1], images=images, step0_inputs=step0,
            # Provenance: only reference code stamps this; the sweep refuses a reference without it.
            extras={"load_s": self.load_seconds, "generate_s": seconds, "backend": "diffusers",
                    "backend_version": diffusers.__version__},
        )

