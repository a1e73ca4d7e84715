"""diffusers' Wan 2.2 pipelines as parity backends: WanPipeline for A14B (two experts) and for TI2V-5B's text-only
mode (expand_timesteps), WanImageToVideoPipeline for TI2V-5B's image-conditioned mode. The stock pipelines, recorded
through hooks only (each denoiser's inputs and outputs, the latents after each step); nothing here changes diffusers'
numerics. The guided prediction of each step is recomputed from the recorded outputs with the pipeline's formula
(uncond + s (cond - uncond)), because the step callback does not expose it.

The transformers are built from their folders by hand (config, then the checkpoint, then each parameter's dtype,
WanTransformer3DModel._keep_in_fp32_modules kept in float32 and buffers untouched, as from_pretrained does): without accelerate,
from_pretrained refuses models that keep modules in float32. Latents are reported as (B, F * H * W, C), the engine's
layout (engine/pipelines/wan.py); its few shared helpers are copied here (tests/test_wan_pipeline.py checks them).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import diffusers
import numpy as np
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from PIL import Image
from safetensors.torch import load_file

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided

DENOISER = "wan.denoiser"


def condition_image() -> Image.Image:
    y, x = np.mgrid[0:100, 0:120].astype(np.float32)
    rgb = np.stack([127.5 + 127.5 * np.sin(x / 11.0), 127.5 + 127.5 * np.cos(y / 8.0),
                    255.0 * (x + y) / (100 + 120)], axis=-1)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def pack(latents: torch.Tensor) -> torch.Tensor:
    return latents.flatten(2).transpose(1, 2)


def load_transformer(folder: Path, dtype: torch.dtype) -> WanTransformer3DModel:
    model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder))
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    model.load_state_dict(state, strict=True)
    # Each parameter in the run's dtype except those under a module kept in float32; buffers (the RoPE tables)
    # stay as the constructor made them (float32), as from_pretrained leaves them.
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, param in model.named_parameters():
        param.data = param.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model.eval()


class BenchWanTransformer(WanTransformer3DModel):
    """WanTransformer3DModel as `parity bench` builds it: on the meta device, then assigned a synthesized state dict.
    Its RoPE tables are non-persistent buffers that assignment does not reach; they are computed again on the CPU as
    the constructor computes them (float64 angles) and moved to the weights' device. Numerics untouched."""

    def load_state_dict(self, state_dict, *args, **kwargs):
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        out = super().load_state_dict(state_dict, *args, **kwargs)
        c = self.config
        with torch.device("cpu"):
            rope = WanRotaryPosEmbed(c.attention_head_dim, tuple(c.patch_size), c.rope_max_seq_len)
        self.rope = rope.to(next(iter(state_dict.values())).device)
        return out


class WanReference:
    """One runner for both Wan families; which denoisers a folder has comes from its model_index.json."""

    family = "wan"
    # component folder -> the diffusers class of that denoiser (what `parity bench` builds as the reference).
    DENOISERS = {"transformer": BenchWanTransformer, "transformer_2": BenchWanTransformer}

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        self.model_cfg = cfg
        root = Path(cfg.model_dir)
        index = json.loads((root / "model_index.json").read_text())
        self.names = tuple(n for n in ("transformer", "transformer_2") if isinstance(index.get(n), list)
                           and index[n][0] is not None)
        models = {n: load_transformer(root / n, cfg.torch_dtype).to(cfg.device) for n in self.names}
        pipe_class = WanImageToVideoPipeline if index["_class_name"] == "WanImageToVideoPipeline" else WanPipeline
        self.pipe = pipe_class.from_pretrained(root, dtype=cfg.torch_dtype, **models).to(cfg.device)
        self.pipe.set_progress_bar_config(disable=True)
        if pipe_class is WanImageToVideoPipeline:  # its text-only mode is WanPipeline on the same components
            self.text_pipe = WanPipeline(tokenizer=self.pipe.tokenizer, text_encoder=self.pipe.text_encoder,
                                         vae=self.pipe.vae, scheduler=self.pipe.scheduler, transformer=models[
                                             "transformer"], expand_timesteps=self.pipe.config.expand_timesteps)
            self.text_pipe.set_progress_bar_config(disable=True)
        else:
            self.text_pipe = self.pipe
        self.load_seconds = time.perf_counter() - t0

    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = dict(inputs)
        model = getattr(self.pipe, self.names[int(inputs.pop(DENOISER, 0))])
        cond, negative, scale = split_guided(inputs)
        device = self.model_cfg.device

        def call(kw):
            return model(**{k: v.to(device) for k, v in kw.items()}, return_dict=False)[0]
        out = call(cond)
        if negative is not None:
            uncond = call(negative)
            out = uncond + scale * (out - uncond)
        return pack(out.float())

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        s = cfg.sampling
        pipe = self.pipe if s.image else self.text_pipe
        calls: list[tuple[int, dict, torch.Tensor]] = []  # (denoiser index, kwargs, output) in call order
        step_latents: list[torch.Tensor] = []
        handles = []
        for idx, name in enumerate(self.names):
            def on_forward(module, args, kwargs, output, idx=idx):
                calls.append((idx, {k: kwargs[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")},
                              output[0]))
            handles.append(getattr(pipe, name).register_forward_hook(on_forward, with_kwargs=True))

        def on_step_end(_pipe, i, t, tensors):
            step_latents.append(pack(tensors["latents"].detach().float().cpu()))
            return {}
        kwargs = dict(image=condition_image()) if s.image else {}
        if "transformer_2" in self.names:
            kwargs["guidance_scale_2"] = s.guidance_scale_2
        try:
            t0 = time.perf_counter()
            result = pipe(prompt=list(cfg.prompts), negative_prompt=[s.negative_prompt] * len(cfg.prompts),
                          guidance_scale=s.guidance_scale, num_frames=s.num_frames, height=cfg.height,
                          width=cfg.width, num_inference_steps=cfg.steps, max_sequence_length=s.max_sequence_length,
                          generator=torch.Generator("cpu").manual_seed(cfg.seed), output_type="np",
                          callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"], **kwargs)
            seconds = time.perf_counter() - t0
        finally:
            for h in handles:
                h.remove()
        per_step = 2 if s.true_cfg else 1
        if len(calls) != per_step * cfg.steps:
            raise RuntimeError(f"recorded {len(calls)} denoiser calls for {cfg.steps} steps x {per_step}")
        scale_2 = s.guidance_scale if s.guidance_scale_2 is None else s.guidance_scale_2
        guided = []
        for i in range(cfg.steps):
            idx, _, out = calls[per_step * i]
            if per_step == 2:
                uncond = calls[2 * i + 1][2]
                out = uncond + (s.guidance_scale if idx == 0 else scale_2) * (out - uncond)
            guided.append(pack(out.detach().float().cpu()))
        idx, cond, _ = calls[0]
        step0 = guided_inputs({k: v.detach().cpu() for k, v in cond.items()},
                              {k: v.detach().cpu() for k, v in calls[1][1].items()} if per_step == 2 else None,
                              s.guidance_scale if per_step == 2 else None)
        step0[DENOISER] = torch.tensor(idx, dtype=torch.int64)
        # The pipeline's own fp32 noise, drawn again from the seed (the first recorded input may hold the image).
        shape = cond["hidden_states"].shape
        initial = pack(torch.randn(shape, generator=torch.Generator("cpu").manual_seed(cfg.seed),
                                   dtype=torch.float32))
        final = step_latents[-1]
        if s.image:  # the pipeline writes the condition over the first frame after the loop
            first = shape[3] * shape[4]
            final = torch.cat([pack(cond["hidden_states"].float().cpu())[:, :first], final[:, first:]], dim=1)
        self.last_calls = calls  # every denoiser call of the last run: per-expert single-step tests read them
        images = (np.asarray(result.frames) * 255).round().astype(np.uint8)  # (B, F, H, W, 3)
        return Artifacts(
            initial_latents=initial, step_latents=torch.stack(step_latents), step_outputs=torch.stack(guided),
            final_latents=final, images=images, step0_inputs=step0,
            extras={"load_s": self.load_seconds, "generate_s": seconds, "backend": "diffusers",
                    "backend_version": diffusers.__version__, "latent_frames": float(shape[2])},
        )


class WanTI2VReference(WanReference):
    family = "wan-ti2v"
    DENOISERS = {"transformer": BenchWanTransformer}
