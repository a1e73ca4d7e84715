"""Wan 2.2 text-to-video (A14B, two experts) and TI2V-5B (one expert; text, or text + image), on UMT5 text features,
the AutoencoderKLWan latent space and the engine's UniPC sampler in flow-prediction mode.

  - A14B: `transformer` denoises steps whose integer timestep t >= boundary_ratio x 1000 (high noise) with
    guidance_scale, `transformer_2` the rest with guidance_scale_2 (None: guidance_scale), as diffusers' WanPipeline.
  - TI2V-5B (expand_timesteps): the timestep is per token. With an image, the first latent frame is the VAE
    encoding of that image (normalized), fed to the model in place of the noisy frame at every step with its tokens'
    timestep zeroed, and written over the final latents' first frame before decoding.
CFG is `uncond + s (cond - uncond)`, two calls per step (conditional first), whenever guidance_scale > 1 (the first
expert's scale decides, as in the reference); the negative prompt defaults to the empty string.

Latents travel as (B, F * H * W, C): latent frames, rows, columns, channels last, so one latent frame is a
contiguous run of tokens (what the temporal metrics split on). The condition image until run configs carry one is
`condition_image()`, a fixed smooth pattern (both backends draw the same one).
"""
from __future__ import annotations

import html
import json
import re
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
from engine.models.wan import WanConfig, WanTransformer, diffusers_key_map
from engine.parallel.transformer import SequenceParallelTransformer
from engine.pipeline import Trajectory, serial_cfg, to_uint8_images
from engine.quant.api import QuantSpec
from engine.sampling.unipc import UniPCConfig, UniPCSampler

# Step-0 input key besides engine.api's: which denoiser (index into Family.denoisers) the step ran, 0-d int64, so a
# single-step comparison can target either expert.
DENOISER = "wan.denoiser"
TEMPORAL = 4  # AutoencoderKLWan's temporal compression: num_frames = 4k + 1
BENCH_FRAMES = 81  # the bench's video length: Wan 2.2's default num_frames (5 s at 16 fps), 21 latent frames


@dataclass(frozen=True)
class WanSampling:
    """WanPipeline's sampling parameters. guidance_scale_2 is A14B's low-noise expert's scale (None: the same as
    guidance_scale). num_frames must be 4k + 1. image (TI2V only): condition the first frame on condition_image()."""

    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None
    negative_prompt: str = ""
    num_frames: int = 5
    max_sequence_length: int = 512
    image: bool = False

    def __post_init__(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % TEMPORAL:
            raise ValueError(f"num_frames must be 4k + 1 (1, 5, 9, ..., 81), got {self.num_frames}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")

    @property
    def true_cfg(self) -> bool:
        return self.guidance_scale > 1

    @property
    def cell_tag(self) -> str:
        """Added to a suite cell's name: text-only and image-conditioned TI2V cells are different runs."""
        return "+image" if self.image else ""


def prompt_clean(text: str) -> str:
    """The reference's prompt cleaning: ftfy's fix_text, HTML unescaped twice, whitespace collapsed."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def condition_image() -> Image.Image:
    """TI2V's condition image until run configs carry one: a fixed, smooth, non-square RGB pattern (120 x 100)."""
    y, x = np.mgrid[0:100, 0:120].astype(np.float32)
    rgb = np.stack([127.5 + 127.5 * np.sin(x / 11.0), 127.5 + 127.5 * np.cos(y / 8.0),
                    255.0 * (x + y) / (100 + 120)], axis=-1)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F * H * W, C)."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(B, F * H * W, C) -> (B, C, F, H, W)."""
    return tokens.transpose(1, 2).unflatten(2, size)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def expert_schedule(timesteps: torch.Tensor, boundary: float | None) -> list[int]:
    """The denoiser index of each step: 0 (`transformer`, high noise) while the integer timestep t >= boundary, 1
    (`transformer_2`) after; all 0 without a boundary (one expert)."""
    return [0 if boundary is None or t >= boundary else 1 for t in timesteps]


def guidance_scales(s: WanSampling) -> tuple[float, float]:
    """(the first expert's scale, the second's): guidance_scale_2 None means the same as guidance_scale."""
    return s.guidance_scale, s.guidance_scale if s.guidance_scale_2 is None else s.guidance_scale_2


def token_timesteps(mask: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
    """expand_timesteps: (B, N) per-token timesteps, t on the tokens the sampler moves and 0 on the image-conditioned
    first frame's (mask (1, 1, F, H, W) at latent resolution, read at the patch grid's (F, H/2, W/2))."""
    return (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(batch, -1)


def realigned(model: nn.Module) -> nn.Module:
    """Copy CPU tensors that sit at unaligned addresses (views into a safetensors file) into fresh allocations.
    oneDNN/MKL pick their reduction order by the operand's alignment, so a weight 8 bytes off a 64-byte boundary
    rounds a matmul differently (1 ulp) from the same weight as the reference's load_state_dict copies it."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and t.data_ptr() % 64:
            t.data = t.data.clone()
    return model


# Parameters the reference keeps in float32 whatever the run's dtype (WanTransformer3DModel._keep_in_fp32_modules:
# the timestep embedder, the modulation tables, the cross-attention LayerNorm), by engine parameter name.
FP32_PARAMS = ("time_1.", "time_2.", "scale_shift_table", ".norm2.")


def keep_fp32(model: nn.Module, key_map: dict, component_dir: Path) -> nn.Module:
    """Put FP32_PARAMS back in float32 from the checkpoint (a no-op in an fp32 run), as diffusers loads them."""
    names = [n for n, p in model.named_parameters() if p.dtype != torch.float32 and any(k in n for k in FP32_PARAMS)]
    if names:
        from engine.loading import read_checkpoint

        checkpoint = read_checkpoint(component_dir)
        params = dict(model.named_parameters())
        for n in names:
            params[n].data = checkpoint[key_map[n][0]].to(params[n].device, torch.float32)
    return model


class WanPipeline:
    def __init__(self, cfg: RunConfig, family: Family):
        t0 = time.perf_counter()
        root = Path(cfg.model_dir)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
        self.family, self.model_cfg = family, cfg
        self.denoisers = family.denoisers
        index = json.loads((root / "model_index.json").read_text())
        self.boundary_ratio = index.get("boundary_ratio")
        self.expand_timesteps = bool(index.get("expand_timesteps", False))
        if (self.boundary_ratio is None) != (len(self.denoisers) == 1):
            raise ValueError(f"{root}: boundary_ratio {self.boundary_ratio} does not fit the denoisers "
                             f"{list(self.denoisers)} of family {family.name!r}")
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)
        # Deferred: the registry imports this module, and text encoders and the VAE are needed only to run.
        from diffusers import AutoencoderKLWan
        from diffusers.video_processor import VideoProcessor
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=self.dtype).to(
            self.device).eval()
        self.vae = AutoencoderKLWan.from_pretrained(root / "vae", dtype=self.dtype).to(self.device).eval()
        self.scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.sampler_config = UniPCConfig.from_scheduler_config(self.scheduler_config)
        spec = QuantSpec(cfg.quant, cfg.quant_ignored)
        for name in self.denoisers:
            model, key_map = load_denoiser(family, name, root / name, spec, self.dtype, self.device)
            setattr(self, name, realigned(keep_fp32(model, key_map, root / name)))
        self.spatial = self.vae.config.scale_factor_spatial
        self.video_processor = VideoProcessor(vae_scale_factor=self.spatial)
        self.cfg_executor = serial_cfg  # how the two guidance branches run; CFG parallelism swaps it
        self.load_seconds = time.perf_counter() - t0

    # --- conditioning -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """UMT5's last hidden states over each cleaned prompt, zero past its real tokens, in the model dtype."""
        inputs = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length",
                                max_length=max_sequence_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(max_sequence_length, device=self.device)[None, :] < lengths[:, None]
        return torch.where(keep[..., None], hidden, hidden.new_zeros(())).to(self.dtype)

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        multiple = self.spatial * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return (num_frames - 1) // TEMPORAL + 1, height // self.spatial, width // self.spatial

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) of the VAE's latent normalization, (1, C, 1, 1, 1) in like's dtype and device."""
        c = self.vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    @torch.no_grad()
    def image_condition(self, batch: int, height: int, width: int) -> torch.Tensor:
        """The condition image's normalized latent (B, C, 1, h, w) float32: VAE mean (no sampling)."""
        image = self.video_processor.preprocess(condition_image(), height=height, width=width).to(
            self.device, dtype=torch.float32)
        latent = self.vae.encode(image.unsqueeze(2).to(self.vae.dtype)).latent_dist.mode()
        latent = latent.repeat(batch, 1, 1, 1, 1).to(self.device, torch.float32)
        mean, inv_std = self._latent_stats(latent)
        return (latent - mean) * inv_std

    # --- the denoisers ------------------------------------------------------------------------------------
    def call(self, name: str, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x, t, text)

    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's guided prediction on diffusers-named inputs (hidden_states, timestep, encoder_hidden_states;
        both branches and the scale when guided), by the denoiser named in DENOISER (default the first), packed."""
        inputs = dict(inputs)
        name = self.denoisers[int(inputs.pop(DENOISER, 0))]
        cond, negative, scale = split_guided(inputs)

        def branch(kwargs):
            return denoiser_forward(getattr(self, name), {k: v.to(self.device) for k, v in kwargs.items()})
        if negative is None:
            return pack(branch(cond).float())
        c, u = self.cfg_executor(lambda: branch(cond), lambda: branch(negative))
        return pack(guide(c, u, scale).float())

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        self.model_cfg.check_same_model(cfg)
        s: WanSampling = cfg.sampling
        if s.image and not self.expand_timesteps:
            raise ValueError(f"sampling.image conditions TI2V (expand_timesteps) models only; {self.family.name} "
                             "is text-to-video")
        if s.guidance_scale_2 is not None and self.boundary_ratio is None:
            raise ValueError("guidance_scale_2 needs a two-expert model (boundary_ratio); this model has one expert")
        scales = guidance_scales(s)
        batch = len(cfg.prompts)
        text = self.encode_prompt(list(cfg.prompts), s.max_sequence_length)
        negative = self.encode_prompt([s.negative_prompt] * batch, s.max_sequence_length) if s.true_cfg else None
        size = self.latent_size(s.num_frames, cfg.height, cfg.width)
        channels = getattr(self, self.denoisers[0]).config.in_channels
        latents = torch.randn((batch, channels, *size), generator=torch.Generator("cpu").manual_seed(cfg.seed),
                              dtype=torch.float32).to(self.device)
        condition = self.image_condition(batch, cfg.height, cfg.width) if s.image else None
        # 1 on the tokens the sampler moves, 0 on the image-conditioned first frame (its tokens' timestep is 0).
        mask = torch.ones((1, 1, *size), dtype=torch.float32, device=self.device)
        if condition is not None:
            mask[:, :, 0] = 0
        sampler = UniPCSampler(cfg.steps, self.sampler_config)
        boundary = (None if self.boundary_ratio is None
                    else self.boundary_ratio * self.sampler_config.num_train_timesteps)
        experts = expert_schedule(sampler.timesteps, boundary)
        step0: dict[str, torch.Tensor] = {}
        step_latents, step_outputs = [], []
        initial = pack(latents).detach().float().cpu()
        t0 = time.perf_counter()
        for i, t in enumerate(sampler.timesteps):
            index = experts[i]
            name, scale = self.denoisers[index], scales[index]
            x = latents if condition is None else (1 - mask) * condition + mask * latents
            x = x.to(self.dtype)
            if self.expand_timesteps:  # one timestep per token, (F, H/2, W/2) of the patch grid
                timestep = token_timesteps(mask, t.to(self.device), batch)
            else:
                timestep = t.to(self.device).expand(batch)
            if i == 0:
                step0.update(guided_inputs(dict(hidden_states=x.clone(), timestep=timestep.clone(),
                                                encoder_hidden_states=text),
                                           None if negative is None else dict(hidden_states=x.clone(),
                                                                               timestep=timestep.clone(),
                                                                               encoder_hidden_states=negative),
                                           scale if negative is not None else None))
                step0[DENOISER] = torch.tensor(index, dtype=torch.int64)
            if negative is None:
                velocity = self.call(name, x, timestep, text)
            else:
                c, u = self.cfg_executor(lambda: self.call(name, x, timestep, text),
                                         lambda: self.call(name, x, timestep, negative))
                velocity = guide(c, u, scale)
            latents = sampler.step(velocity, latents)
            step_outputs.append(pack(velocity).detach().float().cpu())
            step_latents.append(pack(latents).detach().float().cpu())
        denoise_s = time.perf_counter() - t0
        if condition is not None:
            latents = (1 - mask) * condition + mask * latents
        traj = Trajectory(torch.stack(step_latents), torch.stack(step_outputs), latents)
        return Artifacts(
            initial_latents=initial, step_latents=traj.latents, step_outputs=traj.outputs,
            final_latents=pack(traj.final).detach().float().cpu(), images=self.decode(traj.final),
            step0_inputs={k: v.detach().cpu() for k, v in step0.items()},
            extras={"load_s": self.load_seconds, "denoise_s": denoise_s, "latent_frames": float(size[0]),
                    **summary(self.family, self)},
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        latents = latents.to(self.device, self.vae.dtype)
        mean, inv_std = self._latent_stats(latents)
        return to_uint8_images(self.vae.decode(latents / inv_std + mean, return_dict=False)[0])


# --- the family's hooks for generic code ---------------------------------------------------------------------------
def denoiser_builder(name: str, config: dict):
    cfg = WanConfig.from_diffusers(config)
    return (lambda: WanTransformer(cfg)), diffusers_key_map(cfg)


def denoiser_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One call on diffusers-named inputs: hidden_states (B, C, F, H, W) in the model dtype, timestep (B,) or (B, N),
    encoder_hidden_states (B, L, text_dim). Returns (B, C, F, H, W)."""
    return model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])


def bench_inputs(name: str, config: dict, shape: BenchShape, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Random denoiser inputs at `shape`: latents at 1/8 of the frame size (16 channels; the A14B VAE) or 1/16
    (48 channels, TI2V), BENCH_FRAMES video frames (21 latent frames), shape.text_tokens of text, drawn on the
    CPU."""
    g = torch.Generator("cpu").manual_seed(shape.seed)
    spatial = 16 if config["in_channels"] == 48 else 8
    frames = (BENCH_FRAMES - 1) // TEMPORAL + 1
    x = torch.randn(shape.batch, config["in_channels"], frames, shape.height // spatial, shape.width // spatial,
                    generator=g)
    return dict(hidden_states=x.to(device, dtype), timestep=torch.full([shape.batch], 500.0).to(device),
                encoder_hidden_states=torch.randn(shape.batch, shape.text_tokens, config["text_dim"],
                                                  generator=g).to(device, dtype))


class WanParallel(SequenceParallelTransformer):
    """Wan: self-attention runs over the video tokens alone (text_len 0), so the video tokens are sharded over the
    sequence group with their RoPE rows and, under expand_timesteps, their per-token modulation; cross-attention
    keeps the whole projected text on every rank (each rank's query shard attends to all of it, locally), and the
    text embedding runs whole on every rank."""

    def __init__(self, inner: nn.Module, mesh):
        heads = inner.config.num_attention_heads
        if heads % mesh.ulysses.size:
            raise ValueError(f"Ulysses degree {mesh.ulysses.size} must divide Wan's {heads} attention heads")
        super().__init__(inner, mesh)  # swaps inner.attention (self-attention only) for the SP attention

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
                ) -> torch.Tensor:
        inner = self.inner
        x, text, temb, proj, cos, sin, grid = inner.prepare(hidden_states, timestep, encoder_hidden_states)
        # Each token's index travels with it (cut by the same plan), so a shard picks its own RoPE rows and, per
        # token, its own modulation.
        index = torch.arange(x.shape[1], device=x.device)[:, None]

        def call(window, window_index):
            idx = window_index[:, 0]
            t, p = (temb[:, idx], proj[:, idx]) if temb.ndim == 3 else (temb, proj)
            return inner.core(window, text, t, p, cos[idx], sin[idx])
        return inner.unpatchify(self.run_sharded(x, index, 0, call), grid)


def _family(name: str, pipeline_class: str, denoisers: tuple[str, ...]) -> Family:
    fam: Family

    def build(cfg: RunConfig) -> WanPipeline:
        return WanPipeline(cfg, fam)
    fam = Family(name=name, diffusers_pipeline=pipeline_class, sampling=WanSampling, denoisers=denoisers,
                 pipeline=build, denoiser_builder=denoiser_builder, denoiser_forward=denoiser_forward,
                 bench_inputs=bench_inputs, sequence_parallel=WanParallel,
                 conditioning=("encoder_hidden_states", "negative.encoder_hidden_states"))  # UMT5 tokens
    return fam


# A14B: WanPipeline with two experts. TI2V-5B: the zoo writes it as WanImageToVideoPipeline (expand_timesteps, no
# image encoder), which runs both its text-only and its image-conditioned modes.
A14B_FAMILY = _family("wan", "WanPipeline", ("transformer", "transformer_2"))
TI2V_FAMILY = _family("wan-ti2v", "WanImageToVideoPipeline", ("transformer",))
