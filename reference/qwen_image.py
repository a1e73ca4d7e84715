"""diffusers QwenImagePipeline and QwenImageEditPipeline as parity backends: the stock pipelines, recorded through
hooks only (the transformer's inputs and outputs, the latents after each step). Nothing here changes diffusers'
numerics. The guided prediction of a true-CFG step is recomputed from the two recorded transformer outputs with the
pipeline's own formula (sliced to the generated image's tokens, combined, norm-rescaled per token)."""
from __future__ import annotations

import time
from typing import Mapping

import diffusers
import numpy as np
import diffusers
import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline, QwenImageTransformer2DModel

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided
from PIL import Image


# The reference reaches the engine only through engine.api, so it keeps its own copies of the few helpers it shares
# with engine/pipelines/qwen_image.py; tests/test_qwen_image_pipeline.py checks that the copies agree.
def condition_image() -> Image.Image:
    """The Edit family's condition image until run configs carry one: a fixed, smooth, non-square RGB pattern
    (120 x 100, aspect 1.2, so a transposed axis shows), the same for both backends."""
    y, x = np.mgrid[0:100, 0:120].astype(np.float32)
    rgb = np.stack([127.5 + 127.5 * np.sin(x / 9.0), 127.5 + 127.5 * np.cos(y / 7.0),
                    255.0 * (x + y) / (100 + 120)], axis=-1)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def shapes_tensor(img_shapes: list[tuple[int, int, int]], batch: int) -> torch.Tensor:
    """img_shapes as a (B, n_images, 3) tensor: step-0 inputs travel as tensors (files, processes)."""
    return torch.tensor([img_shapes] * batch, dtype=torch.int64)


def shapes_list(t: torch.Tensor) -> list[tuple[int, int, int]]:
    rows = {tuple(tuple(int(v) for v in s) for s in sample) for sample in t.tolist()}
    if len(rows) != 1:
        raise ValueError(f"img_shapes differ between samples: {sorted(rows)}; the model needs one layout per batch")
    return list(rows.pop())


class BenchQwenImageTransformer(QwenImageTransformer2DModel):
    """diffusers' QwenImageTransformer2DModel as `parity bench` builds it (on the meta device, weights assigned), with
    its numerics untouched. Two adaptations, both at the call: QwenEmbedRope keeps its frequency tables as plain
    attributes, not buffers, so a meta build holds no data that load_state_dict could fill: that one weightless module
    is rebuilt for real on the first call; and img_shapes arrives as the (B, n_images, 3) tensor of diffusers-named
    inputs (shapes_tensor) and goes in as the list diffusers takes."""

    def forward(self, *args, img_shapes=None, **kwargs):
        rope = self.pos_embed
        if rope.pos_freqs.is_meta:
            self.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)
        if isinstance(img_shapes, torch.Tensor):
            img_shapes = [shapes_list(img_shapes)] * img_shapes.shape[0]
        return super().forward(*args, img_shapes=img_shapes, **kwargs)


class QwenImageReference:
    family = "qwen-image"
    pipeline_class = QwenImagePipeline
    # component folder -> the diffusers class of that denoiser (what `parity bench` builds as the reference).
    DENOISERS = {"transformer": BenchQwenImageTransformer}

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        self.model_cfg = cfg
        self.pipe = self.pipeline_class.from_pretrained(cfg.model_dir, dtype=cfg.torch_dtype).to(cfg.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_seconds = time.perf_counter() - t0

    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's prediction: the transformer on the recorded inputs; for a true-CFG step both recorded
        branches, sliced to the generated image's tokens and combined as the pipeline combines them."""
        cond, negative, scale = split_guided(inputs)

        def call(inputs):
            kwargs = {k: v.to(self.model_cfg.device) for k, v in inputs.items() if k != "img_shapes"}
            shapes = shapes_list(inputs["img_shapes"])
            batch = inputs["hidden_states"].shape[0]
            return self.pipe.transformer(**kwargs, img_shapes=[shapes] * batch, return_dict=False)[0]
        if negative is None:
            return call(cond)
        n = int(np.prod(shapes_list(cond["img_shapes"])[0]))  # the generated image's tokens come first
        return self.guide(call(cond)[:, :n], call(negative)[:, :n], scale)

    @staticmethod
    def guide(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
        """QwenImagePipeline.__call__'s true CFG: combined, then rescaled per token to the conditional norm."""
        comb = neg + scale * (pos - neg)
        return comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def pipeline_inputs(self, cfg: RunConfig) -> dict:
        return dict(max_sequence_length=cfg.sampling.max_sequence_length)

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        calls: list[tuple[dict, torch.Tensor]] = []
        step_latents: list[torch.Tensor] = []
        guided: list[torch.Tensor] = []
        s = cfg.sampling
        do_cfg = s.true_cfg

        def on_forward(module, args, kwargs, output):
            inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            inputs["img_shapes"] = shapes_tensor(kwargs["img_shapes"][0], len(kwargs["img_shapes"]))
            calls.append((inputs, output[0]))

        def on_step_end(pipe, i, t, tensors):
            latents = tensors["latents"]
            step_latents.append(latents.detach().float().cpu())
            n = latents.shape[1]
            if do_cfg:  # the pipeline calls cond then uncond, slices off condition tokens, and combines them
                pred = self.guide(calls[-2][1][:, :n], calls[-1][1][:, :n], s.true_cfg_scale)
            else:
                pred = calls[-1][1][:, :n]
            guided.append(pred.detach().float().cpu())
            return {}

        handle = self.pipe.transformer.register_forward_hook(on_forward, with_kwargs=True)
        try:
            t0 = time.perf_counter()
            result = self.pipe(
                prompt=list(cfg.prompts),
                # One negative per prompt: the Edit processor pairs each text with one condition image.
                negative_prompt=[s.negative_prompt] * len(cfg.prompts) if do_cfg else None,
                true_cfg_scale=s.true_cfg_scale,
                height=cfg.height,
                width=cfg.width,
                num_inference_steps=cfg.steps,
                generator=torch.Generator("cpu").manual_seed(cfg.seed),
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
                **self.pipeline_inputs(cfg),
            )
            seconds = time.perf_counter() - t0
        finally:
            handle.remove()
        # Step 0's inputs; with true CFG both branches (cond first, then uncond) and the scale (issue 16).
        step0_inputs = {k: v.detach().cpu() for k, v in guided_inputs(
            calls[0][0], calls[1][0] if do_cfg else None, s.true_cfg_scale if do_cfg else None).items()}
        n = step_latents[0].shape[1]
        initial = step0_inputs["hidden_states"][:, :n].float()
        images = (np.asarray(result.images) * 255).round().astype(np.uint8)[:, None]  # (B, F=1, H, W, 3)
        return Artifacts(
            initial_latents=initial, step_latents=torch.stack(step_latents), step_outputs=torch.stack(guided),
            final_latents=step_latents[-1], images=images, step0_inputs=step0_inputs,
            # Provenance (issue 16): only reference code stamps this; the sweep refuses a reference without it.
            extras={"load_s": self.load_seconds, "generate_s": seconds, "backend": "diffusers",
                    "backend_version": diffusers.__version__},
        )


class QwenImageEditReference(QwenImageReference):
    family = "qwen-image-edit"
    pipeline_class = QwenImageEditPipeline

    def pipeline_inputs(self, cfg: RunConfig) -> dict:
        # The Edit pipeline has max_sequence_length but never applies it. The condition image is the family's fixed
        # one (condition_image, as the engine's) until run configs carry an image; one copy per prompt,
        # because the processor pairs images with prompts (one image for two prompts is an error).
        return dict(image=[condition_image()] * len(cfg.prompts))

