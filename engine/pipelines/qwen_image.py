"""Qwen-Image text-to-image and Qwen-Image-Edit: Qwen2.5-VL hidden states as the text stream (prompt template,
prefix tokens dropped, padded per prompt with a mask), 2x2-packed latents of the video-shaped VAE, flow-match Euler
with the dynamic shift, and true CFG with a per-token norm rescale.

The Edit pipeline adds a condition image: VAE-encoded at about one megapixel, its packed latents appended after the
generated image's tokens (on RoPE frame index 1) and sliced off the prediction before guidance; the prompt goes
through Qwen2.5-VL together with the image (processor + vision tower), and the negative prompt gets the same image.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from torch import nn

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided
from engine.denoisers import load_denoiser, summary
from engine.family import BenchShape, Family
from engine.models.qwen_image import QwenImageConfig, QwenImageTransformer, diffusers_key_map
from engine.parallel.transformer import SequenceParallelTransformer
from engine.pipeline import denoise_loop, serial_cfg, to_uint8_images
from engine.quant.api import QuantSpec
from engine.sampling.flow_match import dynamic_shift_sigmas

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
T2I_DROP = 34  # tokens of the template's system prefix dropped from the hidden states (34 in the real tokenizer)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_DROP = 64
MAX_TEXT_TOKENS = 1024  # the template's user part is truncated here
CONDITION_AREA = 1024 * 1024  # Edit resizes the condition image to about this many pixels, keeping its aspect


@dataclass(frozen=True)
class QwenImageSampling:
    """Qwen-Image's sampling parameters. True CFG (with the per-token norm rescale) runs only with a negative prompt
    and true_cfg_scale > 1, as diffusers' QwenImagePipeline decides; an empty negative prompt counts as given."""

    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")

    @property
    def true_cfg(self) -> bool:
        return self.true_cfg_scale > 1 and self.negative_prompt is not None


@dataclass(frozen=True)
class QwenImageEditSampling:
    """Qwen-Image-Edit's sampling parameters: true CFG as Qwen-Image's. No max_sequence_length: the Edit pipeline
    keeps every prompt token (diffusers' accepts the argument and never applies it)."""

    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None

    @property
    def true_cfg(self) -> bool:
        return self.true_cfg_scale > 1 and self.negative_prompt is not None


def condition_image() -> Image.Image:
    """The Edit family's condition image until run configs carry one (the family seam, issue 9 part 1): a fixed,
    smooth, non-square RGB pattern (120 x 100, aspect 1.2, so a transposed axis shows), the same for both backends."""
    y, x = np.mgrid[0:100, 0:120].astype(np.float32)
    rgb = np.stack([127.5 + 127.5 * np.sin(x / 9.0), 127.5 + 127.5 * np.cos(y / 7.0),
                    255.0 * (x + y) / (100 + 120)], axis=-1)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, H, W) single-frame latents -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token."""
    b, c, _, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, 1, H, W) for the video-shaped VAE."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, 1, h, w)


def true_cfg(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided prediction with the norm rescale: comb = neg + s (pos - neg), scaled per token (the last dim of the
    packed (B, N, C) prediction) back to the conditional prediction's norm. No epsilon, as the reference."""
    comb = neg + scale * (pos - neg)
    return comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def negative_prompt(sampling) -> str | None:
    """The negative prompt when true CFG runs, else None: CFG needs both true_cfg_scale > 1 and a negative prompt
    (an empty string counts as given); either alone is plain conditional sampling, as in the reference."""
    return sampling.negative_prompt if sampling.true_cfg else None


def shapes_tensor(img_shapes: list[tuple[int, int, int]], batch: int) -> torch.Tensor:
    """img_shapes as a (B, n_images, 3) tensor: step-0 inputs travel as tensors (files, processes)."""
    return torch.tensor([img_shapes] * batch, dtype=torch.int64)


def shapes_list(t: torch.Tensor) -> list[tuple[int, int, int]]:
    rows = {tuple(tuple(int(v) for v in s) for s in sample) for sample in t.tolist()}
    if len(rows) != 1:
        raise ValueError(f"img_shapes differ between samples: {sorted(rows)}; the model needs one layout per batch")
    return list(rows.pop())


class QwenImagePipeline:
    family = "qwen-image"
    denoisers = ("transformer",)
    template, drop = T2I_TEMPLATE, T2I_DROP

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        root = Path(cfg.model_dir)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
        self.model_cfg = cfg
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)
        self.load_text(root)
        # Deferred: the registry imports this module, and text encoders and the VAE are needed only to run.
        from diffusers import AutoencoderKLQwenImage
        from diffusers.image_processor import VaeImageProcessor
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root / "text_encoder", dtype=self.dtype).to(self.device).eval()
        self.vae = AutoencoderKLQwenImage.from_pretrained(root / "vae", dtype=self.dtype).to(self.device).eval()
        self.scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.transformer, _ = load_denoiser(self.record(), "transformer", root / "transformer",
                                            QuantSpec(cfg.quant, cfg.quant_ignored), self.dtype, self.device)
        self.transformer_config = self.transformer.config
        self.vae_scale_factor = 2 ** len(self.vae.config.temperal_downsample)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.cfg_executor = serial_cfg  # how the two guidance branches run; CFG parallelism swaps it
        self.load_seconds = time.perf_counter() - t0

    def load_text(self, root: Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")

    @classmethod
    def record(cls) -> Family:
        return FAMILIES[cls.family]

    # --- conditioning -------------------------------------------------------------------------------------
    def text_inputs(self, texts: list[str], image) -> dict:
        inputs = self.tokenizer(texts, max_length=MAX_TEXT_TOKENS + self.drop, padding=True, truncation=True,
                                return_tensors="pt")
        return {k: inputs[k] for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], image=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last hidden states of Qwen2.5-VL over the templated prompts, the template prefix dropped, each prompt's
        real tokens only, right-padded to the longest; the mask is None when no prompt is padded."""
        inputs = {k: v.to(self.device) for k, v in self.text_inputs([self.template.format(p) for p in prompts],
                                                                      image).items()}
        hidden = self.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]
        mask = inputs["attention_mask"].bool()
        per_prompt = [h[self.drop:] for h in torch.split(hidden[mask], mask.sum(dim=1).tolist(), dim=0)]
        longest = max(len(h) for h in per_prompt)
        embeds = torch.stack([torch.cat([h, h.new_zeros(longest - len(h), h.shape[1])]) for h in per_prompt])
        text_mask = torch.stack([torch.cat([torch.ones(len(h), dtype=torch.long), torch.zeros(longest - len(h),
                                 dtype=torch.long)]) for h in per_prompt]).to(self.device)
        return embeds.to(self.dtype), text_mask

    def truncate(self, embeds: torch.Tensor, mask: torch.Tensor, max_sequence_length: int):
        embeds, mask = embeds[:, :max_sequence_length], mask[:, :max_sequence_length]
        return embeds, None if bool(mask.all()) else mask

    def text(self, prompts: list[str], sampling, image=None):
        return self.truncate(*self.encode_prompt(prompts, image), sampling.max_sequence_length)

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2
        return 2 * (height // f), 2 * (width // f)

    def initial_latents(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """Noise drawn on the CPU from one seeded generator (identical on every device and to the reference)."""
        h, w = self.latent_size(height, width)
        shape = (batch, self.transformer_config.in_channels // 4, 1, h, w)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), device="cpu", dtype=self.dtype)
        return pack_latents(noise).to(self.device)

    def conditions(self, cfg: RunConfig, batch: int):
        """(prompt image for the text encoder, packed condition latents, their img_shapes): none for text-to-image."""
        return None, None, []

    # --- the denoiser -------------------------------------------------------------------------------------
    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's prediction on diffusers-named inputs (what the reference's transformer receives): one denoiser
        call, or for a true-CFG step (engine.api.guided_inputs) both branches through the CFG executor, sliced to
        the generated image's tokens and combined with the norm rescale, as generate() guides."""
        cond, negative, scale = split_guided(inputs)

        def call(kwargs):
            return denoiser_forward(self.transformer, {k: v.to(self.device) for k, v in kwargs.items()})
        if negative is None:
            return call(cond)
        n = math.prod(shapes_list(cond["img_shapes"])[0])  # the generated image comes first; conditions follow
        pos, neg = self.cfg_executor(lambda: call(cond)[:, :n], lambda: call(negative)[:, :n])
        return true_cfg(pos, neg, scale)

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        self.model_cfg.check_same_model(cfg)
        s = cfg.sampling
        prompts = list(cfg.prompts)
        batch = len(prompts)
        prompt_image, cond_latents, cond_shapes = self.conditions(cfg, batch)
        embeds, mask = self.text(prompts, s, prompt_image)
        negative = negative_prompt(s)
        if negative is not None:  # the negative prompt sees the same condition image
            neg_embeds, neg_mask = self.text([negative] * batch, s, prompt_image)
        h, w = self.latent_size(cfg.height, cfg.width)
        latents = self.initial_latents(batch, cfg.height, cfg.width, cfg.seed)
        n = latents.shape[1]
        img_shapes = [(1, h // 2, w // 2)]
        pos_cond = (cond_latents, cond_shapes)
        neg_cond = self.negative_conditions(pos_cond)
        sigmas = dynamic_shift_sigmas(cfg.steps, n, self.scheduler_config)
        step0: dict[str, torch.Tensor] = {}
        neg_step0: dict[str, torch.Tensor | None] = {}

        def branch(x, t, text, text_mask, conditions):
            """One transformer call: the generated image's tokens, then the condition images' (on frames 1...);
            the prediction for the generated image's tokens only."""
            latents_c, shapes_c = conditions
            x_in = x if latents_c is None else torch.cat([x, latents_c], dim=1)
            return self.transformer(x_in, text, t, img_shapes + shapes_c, text_mask)[:, :n]

        def predict(x, i, t):
            if i == 0:
                x_in = x if cond_latents is None else torch.cat([x, cond_latents], dim=1)
                step0.update(hidden_states=x_in.clone(), timestep=t.clone(), encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, img_shapes=shapes_tensor(img_shapes + cond_shapes, batch))
                if negative is not None:  # the negative branch's own inputs, for the guided single step
                    neg_latents, neg_shapes = neg_cond
                    neg_step0.update(step0, encoder_hidden_states=neg_embeds, encoder_hidden_states_mask=neg_mask,
                                     hidden_states=x.clone() if neg_latents is None else torch.cat([x, neg_latents], 1),
                                     img_shapes=shapes_tensor(img_shapes + neg_shapes, batch))
            if negative is None:
                return branch(x, t, embeds, mask, pos_cond)
            pos, neg = self.cfg_executor(lambda: branch(x, t, embeds, mask, pos_cond),
                                         lambda: branch(x, t, neg_embeds, neg_mask, neg_cond))
            return true_cfg(pos, neg, s.true_cfg_scale)

        t0 = time.perf_counter()
        initial = latents.detach().float().cpu()
        traj = denoise_loop(predict, latents, sigmas, self.scheduler_config.get("num_train_timesteps", 1000))
        denoise_s = time.perf_counter() - t0
        decoded = self.vae.decode(self.decode_input(traj.final, h, w), return_dict=False)[0][:, :, 0]
        return Artifacts(
            initial_latents=initial, step_latents=traj.latents, step_outputs=traj.outputs,
            final_latents=traj.final.detach().float().cpu(), images=to_uint8_images(decoded),
            step0_inputs={k: v.detach().cpu() for k, v in guided_inputs(
                step0, neg_step0 or None, s.true_cfg_scale if negative is not None else None).items()},
            extras={"load_s": self.load_seconds, "denoise_s": denoise_s, **summary(self.record(), self)},
        )

    def negative_conditions(self, conditions):
        """What the negative branch is conditioned on besides its prompt: the same condition images as the
        positive one (an Edit whose negative branch lacks the image edits towards a different picture)."""
        return conditions

    def latent_stats(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        view = (1, cfg.z_dim, 1, 1, 1)
        return (torch.tensor(cfg.latents_mean).view(view).to(self.device, dtype),
                torch.tensor(cfg.latents_std).view(view).to(self.device, dtype))

    def decode_input(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        latents = unpack_latents(latents, h, w).to(self.vae.dtype)
        mean, std = self.latent_stats(latents.dtype)
        # Divided by the reciprocal of std, as the reference does: multiplying by std rounds differently.
        return latents / (1.0 / std) + mean


class QwenImageEditPipeline(QwenImagePipeline):
    family = "qwen-image-edit"
    template, drop = EDIT_TEMPLATE, EDIT_DROP

    def load_text(self, root: Path) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(root / "processor")
        self._conditions: dict[int, tuple] = {}

    def text_inputs(self, texts: list[str], image) -> dict:
        inputs = self.processor(text=texts, images=image, padding=True, return_tensors="pt")
        return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    def text(self, prompts: list[str], sampling, image=None):
        # The Edit pipeline keeps every prompt token (no max_sequence_length cut).
        embeds, mask = self.encode_prompt(prompts, image)
        return embeds, None if bool(mask.all()) else mask

    def condition_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) of about CONDITION_AREA pixels with the image's aspect, multiples of 32."""
        ratio = image.width / image.height
        width = math.sqrt(CONDITION_AREA * ratio)
        return round(width / ratio / 32) * 32, round(width / 32) * 32

    @torch.no_grad()
    def conditions(self, cfg: RunConfig, batch: int):
        """One copy of the condition image per prompt, as the stock pipeline takes a batch: the processor sees the
        images as given, the VAE sees them resized to about one megapixel (VaeImageProcessor, as the reference).
        Encoded once per batch size: the megapixel VAE encode costs more than a tiny model's whole denoising."""
        if batch not in self._conditions:
            self._conditions[batch] = self.encode_conditions(batch)
        return self._conditions[batch]

    def encode_conditions(self, batch: int):
        images = [condition_image()] * batch
        height, width = self.condition_size(images[0])
        pixels = self.image_processor.preprocess(images, height, width).unsqueeze(2)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        mean, std = self.latent_stats(latents.dtype)
        latents = (latents - mean) / std
        return images, pack_latents(latents), [(1, latents.shape[3] // 2, latents.shape[4] // 2)]


# --- the families' hooks for generic code --------------------------------------------------------------------------
def denoiser_builder(name: str, config: dict):
    cfg = QwenImageConfig.from_diffusers(config)
    return (lambda: QwenImageTransformer(cfg)), diffusers_key_map(cfg)


def denoiser_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One call on diffusers-named inputs (QwenImageTransformer2DModel's keyword arguments; img_shapes as the
    (B, n_images, 3) tensor step-0 inputs carry)."""
    return model(inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"],
                 shapes_list(inputs["img_shapes"]), inputs.get("encoder_hidden_states_mask"))


def bench_inputs(name: str, config: dict, shape: BenchShape, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Random denoiser inputs at `shape`, drawn on the CPU: one generated image, no text padding (no mask)."""
    g = torch.Generator("cpu").manual_seed(shape.seed)
    h, w = shape.height // 16, shape.width // 16  # VAE /8, then 2x2 packing
    return dict(
        hidden_states=torch.randn(shape.batch, h * w, config["in_channels"], generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(shape.batch, shape.text_tokens, config["joint_attention_dim"],
                                          generator=g).to(device, dtype),
        timestep=torch.full([shape.batch], 0.75).to(device, dtype),
        img_shapes=shapes_tensor([(1, h, w)], shape.batch).to(device),
    )


class QwenImageParallel(SequenceParallelTransformer):
    """Qwen-Image / -Edit: joint sequence [text | image], text replicated. The image sequence is the generated
    image's tokens followed by the condition image's (Edit) and is sharded as one sequence; the model's RoPE rows
    for it (complex64, always computed in float32 from img_shapes over the whole sequence) are cut by the same plan
    as the tokens, so every shard, condition-image tokens included, rotates by its own positions. A padded text
    batch's mask goes to the SP attention's masked path (it covers text keys only)."""

    text_first = True

    def __init__(self, inner: nn.Module, mesh):
        heads = inner.config.num_attention_heads
        if heads % mesh.ulysses.size:
            raise ValueError(f"Ulysses degree {mesh.ulysses.size} must divide Qwen-Image's {heads} attention heads")
        super().__init__(inner, mesh)
        if mesh.sp.size > 1:
            self.sp_attention.local_masked_attention = inner.masked_attention
            inner.masked_attention = self.sp_attention

    def forward(self, img, txt, timestep, img_shapes, txt_mask=None):
        img_rope, txt_rope = self.inner.rope(img_shapes, txt.shape[1], img.device)
        if img_rope.shape[0] != img.shape[1]:
            raise ValueError(f"img_shapes {list(img_shapes)} describe {img_rope.shape[0]} tokens, got {img.shape[1]}")
        return self.run_sharded(img, img_rope, txt.shape[1], lambda x, rows: self.inner(
            x, txt, timestep, img_shapes, txt_mask, rope=(rows, txt_rope)))


def _family(name: str, pipeline: type, sampling: type, diffusers_pipeline: str) -> Family:
    return Family(name=name, diffusers_pipeline=diffusers_pipeline, sampling=sampling, denoisers=("transformer",),
                  pipeline=pipeline, denoiser_builder=denoiser_builder, denoiser_forward=denoiser_forward,
                  bench_inputs=bench_inputs, sequence_parallel=QwenImageParallel,
                  conditioning=("encoder_hidden_states", "negative.encoder_hidden_states"))  # Qwen2.5-VL tokens


FAMILY = _family("qwen-image", QwenImagePipeline, QwenImageSampling, "QwenImagePipeline")
EDIT_FAMILY = _family("qwen-image-edit", QwenImageEditPipeline, QwenImageEditSampling, "QwenImageEditPipeline")
FAMILIES = {f.name: f for f in (FAMILY, EDIT_FAMILY)}
