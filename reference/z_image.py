"""diffusers ZImagePipeline (Z-Image and Z-Image-Turbo) as a parity backend: the stock pipeline, recorded through
hooks only (the transformer's inputs and outputs, the latents after each step). Nothing here changes diffusers'
numerics. The guided velocity of each step is recomputed from the recorded transformer output with the pipeline's
own formula (pos + s (pos - neg), the optional norm clamp, negated), because the pipeline's step callback does not
expose it.

Latents and velocities are reported as packed tokens (B, H/2 * W/2, 4C) in the transformer's patch order, the
engine's layout (engine/pipelines/z_image.py); step-0 inputs carry the per-sample lists as tensors: x (B, C, 1, H, W),
t (B,), cap_feats (B, L, D) zero-padded with cap_lens (B,).
"""
from __future__ import annotations

import time
from typing import Mapping

import diffusers
import numpy as np
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided

# The reference reaches the engine only through engine.api, so it keeps its own copies of the few helpers it shares
# with engine/pipelines/z_image.py; tests/test_z_image.py checks that the copies agree.
CFG_NORMALIZATION = "guided.cfg_normalization"


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C, 1, H, W) -> (B, H/2 * W/2, 4C), token features ordered (row, column, channel)."""
    if latents.ndim == 5:
        latents = latents[:, :, 0]
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // 2) * (w // 2), 4 * c)


def caption_tensors(caps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(c) for c in caps)
    padded = torch.stack([torch.cat([c, c.new_zeros(longest - len(c), c.shape[1])]) for c in caps])
    return padded, torch.tensor([len(c) for c in caps], dtype=torch.int64)


def caption_list(caps: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return [c[:int(n)] for c, n in zip(caps, lengths)]


def guide(pos: list[torch.Tensor], neg: list[torch.Tensor], scale: float, normalization: float) -> torch.Tensor:
    """ZImagePipeline.__call__'s CFG, per sample in float32 (before its negation)."""
    out = []
    for p, n in zip(pos, neg):
        p, n = p.float(), n.float()
        pred = p + scale * (p - n)
        if normalization and normalization > 0.0:
            ori_pos_norm = torch.linalg.vector_norm(p)
            new_pos_norm = torch.linalg.vector_norm(pred)
            max_new_norm = ori_pos_norm * float(normalization)
            if new_pos_norm > max_new_norm:
                pred = pred * (max_new_norm / new_pos_norm)
        out.append(pred)
    return torch.stack(out)


class BenchZImageTransformer(ZImageTransformer2DModel):
    """diffusers' ZImageTransformer2DModel as `parity bench` calls it: the per-sample lists arrive as the tensors of
    diffusers-named inputs (x, t, cap_feats + cap_lens) and the output goes back stacked. Numerics untouched."""

    def forward(self, x, t, cap_feats, cap_lens=None, return_dict: bool = False, **kwargs):
        if isinstance(x, torch.Tensor):
            x = list(x.unbind(0))
            cap_feats = caption_list(cap_feats, cap_lens)
        out = super().forward(x, t, cap_feats, return_dict=False, **kwargs)[0]
        return (torch.stack(out),)


class ZImageReference:
    family = "z-image"
    # component folder -> the diffusers class of that denoiser (what `parity bench` builds as the reference).
    DENOISERS = {"transformer": BenchZImageTransformer}

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        self.model_cfg = cfg
        self.pipe = ZImagePipeline.from_pretrained(cfg.model_dir, dtype=cfg.torch_dtype).to(cfg.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - t0

    def call(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        device = self.model_cfg.device
        x = [xi.to(device) for xi in inputs["x"].unbind(0)]
        caps = [c.to(device) for c in caption_list(inputs["cap_feats"], inputs["cap_lens"])]
        return self.pipe.transformer(x, inputs["t"].to(device), caps, return_dict=False)[0]

    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's velocity: the transformer on the recorded inputs, negated; for a guided step both branches
        in one batched call (positive first), as the pipeline calls them, combined as it combines them."""
        inputs = dict(inputs)
        normalization = float(inputs.pop(CFG_NORMALIZATION, 0.0))
        cond, negative, scale = split_guided(inputs)
        if negative is None:
            return pack(-torch.stack([o.float() for o in self.call(cond)]))
        batch = cond["x"].shape[0]
        caps = caption_list(cond["cap_feats"], cond["cap_lens"]) + caption_list(negative["cap_feats"],
                                                                                negative["cap_lens"])
        joint_caps, joint_lens = caption_tensors(caps)
        out = self.call(dict(x=torch.cat([cond["x"], negative["x"]]), t=torch.cat([cond["t"], negative["t"]]),
                             cap_feats=joint_caps, cap_lens=joint_lens))
        return pack(-guide(out[:batch], out[batch:], scale, normalization))

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        calls: list[tuple[list, torch.Tensor, list, list]] = []
        step_latents: list[torch.Tensor] = []
        guided: list[torch.Tensor] = []
        s = cfg.sampling
        batch = len(cfg.prompts)

        def on_forward(module, args, kwargs, output):
            x, t, caps = args[:3]
            calls.append((x, t, caps, output[0]))

        def on_step_end(pipe, i, t, tensors):
            step_latents.append(pack(tensors["latents"].detach().float().cpu()))
            out = calls[-1][3]
            if len(out) == 2 * batch:  # this step ran CFG: positive then negative in one call
                pred = guide(out[:batch], out[batch:], s.guidance_scale, s.cfg_normalization)
            else:
                pred = torch.stack([o.float() for o in out])
            guided.append(pack(-pred).detach().float().cpu())
            return {}

        handle = self.pipe.transformer.register_forward_hook(on_forward, with_kwargs=True)
        try:
            t0 = time.perf_counter()
            result = self.pipe(
                prompt=list(cfg.prompts),
                negative_prompt=[s.negative_prompt] * batch if s.true_cfg and s.negative_prompt is not None else None,
                guidance_scale=s.guidance_scale,
                cfg_normalization=s.cfg_normalization,
                cfg_truncation=s.cfg_truncation,
                max_sequence_length=s.max_sequence_length,
                height=cfg.height,
                width=cfg.width,
                num_inference_steps=cfg.steps,
                generator=torch.Generator("cpu").manual_seed(cfg.seed),
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            )
            seconds = time.perf_counter() - t0
        finally:
            handle.remove()
        x, t, caps, out = calls[0]
        x, caps = torch.stack(x).detach().cpu(), [c.detach().cpu() for c in caps]
        t = t.detach().cpu()
        cap, lens = caption_tensors(caps[:batch])
        cond = dict(x=x[:batch], t=t[:batch], cap_feats=cap, cap_lens=lens)
        if len(out) == 2 * batch:
            neg, neg_lens = caption_tensors(caps[batch:])
            step0 = guided_inputs(cond, dict(x=x[batch:], t=t[batch:], cap_feats=neg, cap_lens=neg_lens),
                                  s.guidance_scale)
            step0[CFG_NORMALIZATION] = torch.tensor(float(s.cfg_normalization), dtype=torch.float64)
        else:
            step0 = guided_inputs(cond)
        # The pipeline's own fp32 noise (the transformer saw it rounded to the model dtype): drawn again from the seed.
        initial = pack(torch.randn(x[:batch, :, 0].shape, generator=torch.Generator("cpu").manual_seed(cfg.seed),
                                   dtype=torch.float32))
        images = (np.asarray(result.images) * 255).round().astype(np.uint8)[:, None]  # (B, F=1, H, W, 3)
        return Artifacts(
            initial_latents=initial, step_latents=torch.stack(step_latents), step_outputs=torch.stack(guided),
            final_latents=step_latents[-1], images=images, step0_inputs=step0,
            # Provenance: only reference code stamps this; the sweep refuses a reference without it.
            extras={"load_s": self.load_seconds, "generate_s": seconds, "backend": "diffusers",
                    "backend_version": diffusers.__version__},
        )
