"""Z-Image and Z-Image-Turbo text-to-image: Qwen3's second-to-last hidden states over the chat-templated prompt
(each prompt's real tokens only, one caption per sample), fp32 latents of the 16-channel AutoencoderKL, flow-match
Euler on Z-Image's own schedule, and Z-Image's CFG.

Two conventions that set it apart: the model's time runs the other way (t = (1000 - timestep) / 1000, 0 = noise),
and its output is the negative of the velocity the sampler steps with. CFG is `pos + s (pos - neg)` with the
pipeline's guidance_scale as s (w - 1 in the usual notation; CFG runs whenever s > 0), optionally clamped so that
each sample's prediction norm stays below cfg_normalization x the conditional one's, and switched off for steps
whose normalized time (1000 - t) / 1000 exceeds cfg_truncation. Turbo is the same pipeline with few steps and s = 0.

Latents travel as packed tokens (B, H/2 * W/2, 4C), the transformer's patch order, for the artifacts; the model
itself takes and returns per-sample (C, 1, H, W) lists.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided
from engine.denoisers import load_denoiser, summary
from engine.family import BenchShape, Family
from engine.models.z_image import ZImageConfig, ZImageTransformer, diffusers_key_map, patchify
from engine.parallel.attention import JointSequenceParallelAttention
from engine.parallel.transformer import SequenceParallelTransformer
from engine.pipeline import denoise_loop, serial_cfg, to_uint8_images
from engine.quant.api import QuantSpec
from engine.sampling.flow_match import dynamic_shift_sigmas

# Step-0 input key of a guided step besides engine.api's: the norm clamp factor (0-d float64), so the single-step
# comparison recomputes the guided prediction with it.
CFG_NORMALIZATION = "guided.cfg_normalization"


@dataclass(frozen=True)
class ZImageSampling:
    """ZImagePipeline's sampling parameters, with its defaults. guidance_scale is the pipeline's (s in
    pos + s (pos - neg)); CFG runs when it is > 0, against negative_prompt (None: the empty prompt, as the
    reference). cfg_normalization > 0 clamps each sample's guided norm to that multiple of the conditional one's
    (True in diffusers is 1.0); cfg_truncation <= 1 drops CFG on steps whose normalized time exceeds it.
    Z-Image-Turbo: guidance_scale 0 and few steps."""

    guidance_scale: float = 5.0
    negative_prompt: str | None = None
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        if self.guidance_scale < 0 or self.cfg_normalization < 0:
            raise ValueError(f"guidance_scale and cfg_normalization must be >= 0, got {self.guidance_scale}, "
                             f"{self.cfg_normalization}")

    @property
    def true_cfg(self) -> bool:
        return self.guidance_scale > 0


def z_image_sigmas(steps: int, image_seq_len: int, config: dict) -> torch.Tensor:
    """steps + 1 float32 noise levels: the pipeline's linspace(1, 1/steps) drawn by torch in float32 (numpy's
    float64 linspace differs in the last bit), then the scheduler's shift (static, or dynamic from mu)."""
    base = np.array(torch.linspace(1.0, 1 / steps, steps).tolist()).astype(np.float32)
    return dynamic_shift_sigmas(steps, image_seq_len, config, base)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C, 1, H, W) -> (B, H/2 * W/2, 4C) in the transformer's patch order."""
    if latents.ndim == 4:
        latents = latents[:, :, None]
    return patchify(latents, 2, 1)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, 2, 2, c4 // 4).permute(0, 5, 1, 3, 2, 4).reshape(b, c4 // 4, h, w)


def guide(pos: torch.Tensor, neg: torch.Tensor, scale: float, normalization: float) -> torch.Tensor:
    """Z-Image's CFG per sample, in float32: pred = pos + s (pos - neg); with normalization > 0 the prediction is
    scaled down to normalization x ||pos|| when its norm is larger (norms over the whole sample)."""
    out = []
    for p, n in zip(pos.float(), neg.float()):
        pred = p + scale * (p - n)
        if normalization > 0:
            ceiling = torch.linalg.vector_norm(p) * normalization
            norm = torch.linalg.vector_norm(pred)
            if norm > ceiling:
                pred = pred * (ceiling / norm)
        out.append(pred)
    return torch.stack(out)


def velocity(prediction: torch.Tensor) -> torch.Tensor:
    """The flow velocity the sampler steps with: Z-Image's transformer (and its guided combination) predicts its
    negative."""
    return -prediction


def caption_tensors(caps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample captions -> (zero-padded (B, L, D), lengths (B,) int64): step-0 inputs travel as tensors."""
    longest = max(len(c) for c in caps)
    padded_caps = torch.stack([torch.cat([c, c.new_zeros(longest - len(c), c.shape[1])]) for c in caps])
    return padded_caps, torch.tensor([len(c) for c in caps], dtype=torch.int64)


def caption_list(caps: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    return [c[:int(n)] for c, n in zip(caps, lengths)]


class ZImagePipeline:
    family = "z-image"
    denoisers = ("transformer",)

    def __init__(self, cfg: RunConfig):
        # Deferred: the registry imports this module, and text encoders and the VAE are needed only to run.
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, Qwen3Model

        t0 = time.perf_counter()
        root = Path(cfg.model_dir)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
        self.model_cfg = cfg
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.text_encoder = Qwen3Model.from_pretrained(root / "text_encoder", dtype=self.dtype).to(self.device).eval()
        self.vae = AutoencoderKL.from_pretrained(root / "vae", dtype=self.dtype).to(self.device).eval()
        self.scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.transformer, _ = load_denoiser(FAMILY, "transformer", root / "transformer",
                                            QuantSpec(cfg.quant, cfg.quant_ignored), self.dtype, self.device)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.cfg_executor = serial_cfg  # how the two guidance branches run; CFG parallelism swaps it
        self.load_seconds = time.perf_counter() - t0

    # --- conditioning -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        """Qwen3's second-to-last hidden states over each chat-templated prompt (padded to max_sequence_length as
        the reference pads), each prompt's real tokens only."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        inputs = self.tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                return_tensors="pt")
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [h[m] for h, m in zip(hidden, mask)]

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return 2 * (height // f), 2 * (width // f)

    def initial_latents(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """float32 noise drawn on the CPU from one seeded generator (identical on every device and to the
        reference), packed."""
        h, w = self.latent_size(height, width)
        shape = (batch, self.transformer.config.in_channels, h, w)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        return pack(noise).to(self.device)

    def call(self, latents: torch.Tensor, t: torch.Tensor, caps: list[torch.Tensor]) -> torch.Tensor:
        """One transformer call on (B, C, 1, H, W) latents in the model dtype: the stacked raw output."""
        return torch.stack(self.transformer(list(latents.unbind(0)), t, caps))

    # --- the denoiser -------------------------------------------------------------------------------------
    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's velocity on diffusers-named inputs (what the reference's transformer receives): the model
        output, guided as generate() guides when the inputs hold both branches, negated, packed."""
        inputs = dict(inputs)
        normalization = float(inputs.pop(CFG_NORMALIZATION, 0.0))
        cond, negative, scale = split_guided(inputs)

        def branch(kwargs):
            return denoiser_forward(self.transformer, {k: v.to(self.device) for k, v in kwargs.items()})
        if negative is None:
            return pack(velocity(branch(cond).float()))
        batch = cond["x"].shape[0]
        caps = caption_list(cond["cap_feats"], cond["cap_lens"]) + caption_list(negative["cap_feats"],
                                                                                negative["cap_lens"])
        pos, neg = self.branches(lambda: branch(cond), lambda: branch(negative), lambda: self.call(
            torch.cat([cond["x"], negative["x"]]).to(self.device), torch.cat([cond["t"], negative["t"]]).to(self.device),
            [c.to(self.device) for c in caps]), batch)
        return pack(velocity(guide(pos, neg, scale, normalization)))

    def branches(self, cond, uncond, joint, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both CFG branches' outputs. Serially they run as one batch of 2B samples (positive first), as the reference
        runs them: the batch pads every caption to the longest of both branches under one key mask, which rounds
        differently from two batches. A parallel CFG executor runs one branch per rank instead."""
        if self.cfg_executor is serial_cfg:
            out = joint()
            return out[:batch], out[batch:]
        return self.cfg_executor(cond, uncond)

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        self.model_cfg.check_same_model(cfg)
        s: ZImageSampling = cfg.sampling
        prompts = list(cfg.prompts)
        batch = len(prompts)
        caps = self.encode_prompt(prompts, s.max_sequence_length)
        neg_caps = self.encode_prompt([s.negative_prompt or ""] * batch, s.max_sequence_length) if s.true_cfg else []
        h, w = self.latent_size(cfg.height, cfg.width)
        latents = self.initial_latents(batch, cfg.height, cfg.width, cfg.seed)
        sigmas = z_image_sigmas(cfg.steps, (h // 2) * (w // 2), self.scheduler_config)
        train_steps = self.scheduler_config.get("num_train_timesteps", 1000)
        timesteps = (sigmas[:-1] * train_steps).to(self.device)
        # CFG is dropped on steps whose normalized time exceeds cfg_truncation (only when cfg_truncation <= 1).
        truncate = s.true_cfg and s.cfg_truncation <= 1
        t_norms = ((1000 - timesteps.float()) / 1000).tolist()  # in float32, as the reference compares them
        cfg_on = [s.true_cfg and not (truncate and t_norm > s.cfg_truncation) for t_norm in t_norms]
        step0: dict[str, torch.Tensor] = {}

        def predict(x, i, _t):
            model_t = (1000 - timesteps[i].expand(batch)) / 1000
            x_in = unpack(x, h, w).to(self.dtype)[:, :, None]
            if i == 0:
                cap, lens = caption_tensors(caps)
                step0.update(x=x_in.clone(), t=model_t.clone(), cap_feats=cap, cap_lens=lens)
                if cfg_on[0]:
                    neg, neg_lens = caption_tensors(neg_caps)
                    step0.update(guided_inputs(dict(step0), dict(step0, cap_feats=neg, cap_lens=neg_lens),
                                               s.guidance_scale))
                    step0[CFG_NORMALIZATION] = torch.tensor(float(s.cfg_normalization), dtype=torch.float64)
            if not cfg_on[i]:
                return pack(velocity(self.call(x_in, model_t, caps).float()))
            pos, neg = self.branches(lambda: self.call(x_in, model_t, caps), lambda: self.call(x_in, model_t, neg_caps),
                                     lambda: self.call(torch.cat([x_in, x_in]), torch.cat([model_t, model_t]),
                                                       caps + neg_caps), batch)
            return pack(velocity(guide(pos, neg, s.guidance_scale, s.cfg_normalization)))

        t0 = time.perf_counter()
        initial = latents.detach().float().cpu()
        traj = denoise_loop(predict, latents, sigmas, train_steps)
        denoise_s = time.perf_counter() - t0
        vae_cfg = self.vae.config
        decoded = self.vae.decode(unpack(traj.final, h, w).to(self.vae.dtype) / vae_cfg.scaling_factor
                                  + vae_cfg.shift_factor, return_dict=False)[0]
        return Artifacts(
            initial_latents=initial, step_latents=traj.latents, step_outputs=traj.outputs,
            final_latents=traj.final.detach().float().cpu(), images=to_uint8_images(decoded),
            step0_inputs={k: v.detach().cpu() for k, v in step0.items()},
            extras={"load_s": self.load_seconds, "denoise_s": denoise_s, **summary(FAMILY, self)},
        )


# --- the family's hooks for generic code ---------------------------------------------------------------------------
def denoiser_builder(name: str, config: dict):
    cfg = ZImageConfig.from_diffusers(config)
    return (lambda: ZImageTransformer(cfg)), diffusers_key_map(cfg)


def denoiser_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One call on diffusers-named inputs: x (B, C, 1, H, W) in the model dtype, t (B,) (1 = clean), cap_feats
    (B, L, D) zero-padded with cap_lens (B,) real lengths. Returns the raw model output stacked (B, C, 1, H, W)."""
    x = inputs["x"]
    return torch.stack(model(list(x.unbind(0)), inputs["t"], caption_list(inputs["cap_feats"], inputs["cap_lens"])))


def bench_inputs(name: str, config: dict, shape: BenchShape, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Random denoiser inputs at `shape`, drawn on the CPU: 16-channel latents at 1/8 of the image size, one
    caption of shape.text_tokens tokens per sample."""
    g = torch.Generator("cpu").manual_seed(shape.seed)
    h, w = shape.height // 8, shape.width // 8
    return dict(
        x=torch.randn(shape.batch, config["in_channels"], 1, h, w, generator=g).to(device, dtype),
        t=torch.full([shape.batch], 0.25).to(device),
        cap_feats=torch.randn(shape.batch, shape.text_tokens, config["cap_feat_dim"], generator=g).to(device, dtype),
        cap_lens=torch.full([shape.batch], shape.text_tokens, dtype=torch.int64).to(device),
    )


class ZImageParallel(SequenceParallelTransformer):
    """Z-Image: the joint sequence is [image | caption], the caption a replicated suffix. The image segment (its
    patches, then the x_pad_token slots) is sharded, together with its pad flags and its RoPE rows; the caption is
    embedded and refined whole on every rank (the context refiner sees only the caption), keeps its own RoPE rows
    (positions 1 .. L, never sharded) and its place after the image, and enters every softmax exactly once (the SP
    attention's suffix path). The noise refiner attends over image tokens only: a second SP attention with no text.
    A batch of captions of different lengths carries a key mask over caption keys only."""

    text_first = False

    def __init__(self, inner: nn.Module, mesh):
        heads = inner.config.n_heads
        if heads % mesh.ulysses.size:
            raise ValueError(f"Ulysses degree {mesh.ulysses.size} must divide Z-Image's {heads} attention heads")
        local = inner.joint_attention
        super().__init__(inner, mesh)  # sets inner.attention (all three sites) to the joint SP attention
        if mesh.sp.size > 1:
            self.sp_image_attention = JointSequenceParallelAttention(mesh, local_attention=local)
            inner.image_attention = self.sp_image_attention
            inner.joint_attention = self.sp_attention
            inner.caption_attention = local
            self.sp_attention.local_masked_attention = inner.masked_attention
            inner.masked_attention = self.sp_attention

    @property
    def attention(self):
        return self.inner.attention

    @attention.setter
    def attention(self, fn) -> None:
        if self.mesh.sp.size > 1:
            self.sp_attention.local_attention = self.sp_image_attention.local_attention = fn
            self.inner.caption_attention = fn
        else:
            self.inner.attention = fn

    def forward(self, x: list[torch.Tensor], t: torch.Tensor, cap_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = self.inner
        latents, caps, layout, temb = inner.prepare(x, t, cap_feats)
        cap = inner.embed_caption(caps, layout)  # replicated: every rank refines the whole caption
        tokens = inner.image_tokens(latents)
        # Pad flags and RoPE rows travel with their tokens: one (N, ...) tensor cut by the same plan.
        rows = torch.cat([layout.image_freqs.transpose(0, 1),
                          layout.image_pad[:, None, None].expand(-1, tokens.shape[0], 1).to(torch.complex64)], -1)

        def call(window, window_rows):
            if self.mesh.sp.size > 1:
                self.sp_image_attention.configure(0, False, self.sp_attention.plan)
            freqs, pad = window_rows[..., :-1].transpose(0, 1), window_rows[:, 0, -1].real.bool()
            return inner.core(window, pad, freqs, cap, layout, temb)
        out = self.run_sharded(tokens, rows, cap.shape[1], call)
        return inner.unpack(out, layout)


FAMILY = Family(name="z-image", diffusers_pipeline="ZImagePipeline", sampling=ZImageSampling,
                denoisers=("transformer",), pipeline=ZImagePipeline, denoiser_builder=denoiser_builder,
                denoiser_forward=denoiser_forward, bench_inputs=bench_inputs, sequence_parallel=ZImageParallel,
                conditioning=("cap_feats", "negative.cap_feats"))  # Qwen3 hidden_states[-2], zero-padded
