"""diffusers FluxPipeline as a parity backend: runs the stock pipeline and records, through hooks only, the
denoiser's inputs and outputs at every step. Nothing here changes diffusers' numerics."""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch
import diffusers
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided


class Flux1Reference:
    family = "flux1"
    # component folder -> the diffusers class of that denoiser (what `parity bench` builds as the reference).
    DENOISERS = {"transformer": FluxTransformer2DModel}

    def __init__(self, cfg: RunConfig, components: Mapping[str, Any] | None = None):
        """The stock pipeline from cfg.model_dir; or, with `components` (what engine.api.open_runner takes: every
        component built, the transformer as DenoiserWeights, the scheduler as its config dict), the stock pipeline
        assembled from them, for a bench on weights synthesized on the GPU."""
        t0 = time.perf_counter()
        self.model_cfg = cfg
        if components is None:
            self.pipe = FluxPipeline.from_pretrained(cfg.model_dir, dtype=cfg.torch_dtype).to(cfg.device)
        else:
            self.pipe = FluxPipeline(**self.assemble(components, cfg.torch_dtype)).to(cfg.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def assemble(cls, components: Mapping[str, Any], dtype: torch.dtype) -> dict:
        """FluxPipeline's constructor arguments from built components: the transformer class built on meta and
        assigned the given state dict, the scheduler made from its config."""
        parts = dict(components)
        weights = parts["transformer"]
        with torch.device("meta"):
            model = cls.DENOISERS["transformer"](**{k: v for k, v in weights.config.items() if not k.startswith("_")})
        model.load_state_dict({k: v.to(dtype) for k, v in weights.state_dict.items()}, assign=True, strict=True)
        parts["transformer"] = model.eval().requires_grad_(False)
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(dict(parts["scheduler"]))
        return parts

    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's prediction: the transformer on the recorded inputs; for a true-CFG step both recorded
        branches, combined as FluxPipeline combines them."""
        cond, negative, scale = split_guided(inputs)

        def call(kwargs):
            return self.pipe.transformer(**{k: v.to(self.model_cfg.device) for k, v in kwargs.items()},
                                         return_dict=False)[0]
        if negative is None:
            return call(cond)
        return self.guide(call(cond), call(negative), scale)

    @staticmethod
    def guide(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
        return neg + scale * (pos - neg)  # FluxPipeline.__call__, true CFG

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        calls: list[tuple[dict, torch.Tensor]] = []
        step_latents: list[torch.Tensor] = []
        guided: list[torch.Tensor] = []
        s = cfg.sampling
        do_cfg = s.true_cfg

        def on_forward(module, args, kwargs, output):
            calls.append(({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}, output[0]))

        def on_step_end(pipe, i, t, tensors):
            step_latents.append(tensors["latents"].detach().float().cpu())
            if do_cfg:  # the pipeline calls cond then uncond and combines them as guide() does
                pred = self.guide(calls[-2][1], calls[-1][1], s.true_cfg_scale)
            else:
                pred = calls[-1][1]
            guided.append(pred.detach().float().cpu())
            return {}

        handle = self.pipe.transformer.register_forward_hook(on_forward, with_kwargs=True)
        try:
            t0 = time.perf_counter()
            result = self.pipe(
                prompt=list(cfg.prompts),
                negative_prompt=s.negative_prompt if do_cfg else None,
                true_cfg_scale=s.true_cfg_scale,
                height=cfg.height,
                width=cfg.width,
                num_inference_steps=cfg.steps,
                guidance_scale=s.guidance,
                max_sequence_length=s.max_sequence_length,
                generator=torch.Generator("cpu").manual_seed(cfg.seed),
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            )
            seconds = time.perf_counter() - t0
        finally:
            handle.remove()
        # Step 0's inputs; with true CFG both branches (cond first, then uncond) and the scale (issue 16).
        step0_inputs = {k: v.detach().cpu() for k, v in guided_inputs(
            calls[0][0], calls[1][0] if do_cfg else None, s.true_cfg_scale if do_cfg else None).items()}
        initial = step0_inputs["hidden_states"].float()
        images = (np.asarray(result.images) * 255).round().astype(np.uint8)[:, None]  # (B, F=1, H, W, 3)
        return Artifacts(
            initial_latents=initial, step_latents=torch.stack(step_latents), step_outputs=torch.stack(guided),
            final_latents=step_latents[-1], images=images, step0_inputs=step0_inputs,
            # Provenance (issue 16): only reference code stamps this; the sweep refuses a reference without it.
            extras={"load_s": self.load_seconds, "generate_s": seconds, "backend": "diffusers",
                    "backend_version": diffusers.__version__},
        )
