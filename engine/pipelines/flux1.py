"""FLUX.1 text-to-image: CLIP pooled + T5 sequence conditioning, 2x2-packed latents, guidance-distilled model
with optional true CFG (negative prompt and true_cfg_scale > 1)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided
from engine.denoisers import load_denoiser, load_denoiser_weights, summary
from engine.family import BenchShape, Family
from engine.models.flux1 import Flux1Config, Flux1Transformer, diffusers_key_map
from engine.parallel.transformer import SequenceParallelTransformer
from engine.pipeline import denoise_loop, serial_cfg, to_uint8_images
from engine.quant.api import QuantSpec
from engine.sampling.flow_match import dynamic_shift_sigmas


@dataclass(frozen=True)
class FluxSampling:
    """FLUX.1's sampling parameters. `guidance` feeds the guidance-distilled embedder; true CFG runs only with a
    negative prompt and true_cfg_scale > 1 (as diffusers' FluxPipeline decides)."""

    guidance: float = 3.5
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    max_sequence_length: int = 32

    def __post_init__(self) -> None:
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")

    @property
    def true_cfg(self) -> bool:
        return self.true_cfg_scale > 1 and self.negative_prompt is not None


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 latent patch becomes one token."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h2: int, w2: int) -> torch.Tensor:
    """(h2 * w2, 3) position ids: axis 0 unused for images (0), axis 1 row, axis 2 column."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


# The pipeline's component folders (FluxPipeline's model_index.json), the names `components` may give.
COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler", "transformer")


def _check_denoiser(name: str) -> None:
    if name not in Flux1Pipeline.denoisers:
        raise ValueError(f"flux1 has no denoiser {name!r}; valid: {list(Flux1Pipeline.denoisers)}")


class Flux1Pipeline:
    family = "flux1"
    denoisers = ("transformer",)  # the denoiser components: folder names and attributes of a loaded pipeline

    def __init__(self, cfg: RunConfig, components: Mapping[str, Any] | None = None):
        """Load every component from cfg.model_dir, except those given built in `components` (folder name ->
        tokenizer, text encoder or VAE object; "scheduler" -> its config dict; "transformer" -> DenoiserWeights),
        which a bench passes to run the pipeline on weights synthesized on the GPU."""
        # Deferred: the registry imports this module, and text encoders and the VAE are needed only to run.
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        t0 = time.perf_counter()
        given = dict(components or {})
        if unknown := sorted(set(given) - set(COMPONENTS)):
            raise ValueError(f"flux1 pipeline has no component(s) {unknown}; valid: {list(COMPONENTS)}")
        root = Path(cfg.model_dir)
        if set(given) != set(COMPONENTS) and not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
        self.model_cfg = cfg
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)

        def component(name, load):
            return given[name] if name in given else load(root / name)
        self.tokenizer = component("tokenizer", AutoTokenizer.from_pretrained)
        self.tokenizer_2 = component("tokenizer_2", AutoTokenizer.from_pretrained)
        self.text_encoder = component("text_encoder", lambda p: CLIPTextModel.from_pretrained(p, dtype=self.dtype)
                                      ).to(self.device).eval()
        self.text_encoder_2 = component("text_encoder_2", lambda p: T5EncoderModel.from_pretrained(p, dtype=self.dtype)
                                        ).to(self.device).eval()
        self.vae = component("vae", lambda p: AutoencoderKL.from_pretrained(p, dtype=self.dtype)).to(self.device).eval()
        self.scheduler_config = dict(component("scheduler", lambda p: json.loads(
            (p / "scheduler_config.json").read_text())))
        spec = QuantSpec(cfg.quant, cfg.quant_ignored)
        if "transformer" in given:
            self.transformer, _ = load_denoiser_weights(FAMILY, "transformer", given["transformer"], spec, self.dtype,
                                                        self.device)
        else:
            self.transformer, _ = load_denoiser(FAMILY, "transformer", root / "transformer", spec, self.dtype,
                                                self.device)
        self.transformer_config = self.transformer.config
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.cfg_executor = serial_cfg  # how the two guidance branches run; CFG parallelism swaps it
        self.load_seconds = time.perf_counter() - t0

    # --- conditioning -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_sequence_length: int):
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output.to(self.dtype)
        t5_ids = self.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length,
                                  truncation=True, return_tensors="pt").input_ids
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0].to(self.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        return embeds, pooled, txt_ids

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2
        return 2 * (height // f), 2 * (width // f)

    def initial_latents(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """Noise drawn on the CPU from one seeded generator, so it is identical on every device and to the
        reference given the same CPU generator."""
        h, w = self.latent_size(height, width)
        shape = (batch, self.transformer_config.in_channels // 4, h, w)
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=self.dtype)
        return pack_latents(noise).to(self.device)

    # --- the denoiser -------------------------------------------------------------------------------------
    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's prediction on diffusers-named inputs (what the reference's transformer receives): one denoiser
        call, or for a true-CFG step (engine.api.guided_inputs) both branches through the CFG executor, combined."""
        cond, negative, scale = split_guided(inputs)

        def call(kwargs):
            return denoiser_forward(self.transformer, {k: v.to(self.device) for k, v in kwargs.items()})
        if negative is None:
            return call(cond)
        v, v_neg = self.cfg_executor(lambda: call(cond), lambda: call(negative))
        return true_cfg(v, v_neg, scale)

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        self.model_cfg.check_same_model(cfg)
        s: FluxSampling = cfg.sampling
        prompts = list(cfg.prompts)
        batch = len(prompts)
        embeds, pooled, txt_ids = self.encode_prompt(prompts, s.max_sequence_length)
        do_cfg = s.true_cfg
        if do_cfg:
            neg_embeds, neg_pooled, neg_txt_ids = self.encode_prompt([s.negative_prompt] * batch, s.max_sequence_length)
        h, w = self.latent_size(cfg.height, cfg.width)
        latents = self.initial_latents(batch, cfg.height, cfg.width, cfg.seed)
        img_ids = image_ids(h // 2, w // 2).to(device=self.device, dtype=self.dtype)
        guidance = (torch.full([batch], s.guidance, device=self.device, dtype=torch.float32)
                    if self.transformer_config.guidance_embeds else None)
        sigmas = dynamic_shift_sigmas(cfg.steps, latents.shape[1], self.scheduler_config)
        step0: dict[str, torch.Tensor] = {}
        negative: dict[str, torch.Tensor] = {}

        def predict(x, i, t):
            if i == 0:
                step0.update(hidden_states=x.clone(), timestep=t.clone(), guidance=guidance, pooled_projections=pooled,
                             encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids)
                if do_cfg:
                    negative.update(step0, pooled_projections=neg_pooled, encoder_hidden_states=neg_embeds,
                                    txt_ids=neg_txt_ids)
            if not do_cfg:
                return self.transformer(x, embeds, t, pooled, img_ids, txt_ids, guidance)
            v, v_neg = self.cfg_executor(
                lambda: self.transformer(x, embeds, t, pooled, img_ids, txt_ids, guidance),
                lambda: self.transformer(x, neg_embeds, t, neg_pooled, img_ids, neg_txt_ids, guidance),
            )
            return true_cfg(v, v_neg, s.true_cfg_scale)

        t0 = time.perf_counter()
        initial = latents.detach().float().cpu()
        traj = denoise_loop(predict, latents, sigmas, self.scheduler_config.get("num_train_timesteps", 1000))
        denoise_s = time.perf_counter() - t0
        decoded = self.vae.decode(self.decode_input(traj.final, h, w), return_dict=False)[0]
        return Artifacts(
            initial_latents=initial, step_latents=traj.latents, step_outputs=traj.outputs,
            final_latents=traj.final.detach().float().cpu(), images=to_uint8_images(decoded),
            step0_inputs={k: v.detach().cpu() for k, v in guided_inputs(
                step0, negative or None, s.true_cfg_scale if do_cfg else None).items()},
            extras={"load_s": self.load_seconds, "denoise_s": denoise_s, **summary(FAMILY, self)},
        )

    def decode_input(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        cfg = self.vae.config
        return unpack_latents(latents, h, w) / cfg.scaling_factor + cfg.shift_factor


def true_cfg(v: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """FLUX.1's true-CFG combine (FluxPipeline): uncond + s (cond - uncond), no rescale."""
    return v_neg + scale * (v - v_neg)


# --- the family's hooks for generic code ---------------------------------------------------------------------------
def denoiser_builder(name: str, config: dict):
    cfg = Flux1Config.from_diffusers(config)
    return (lambda: Flux1Transformer(cfg)), diffusers_key_map(cfg)


def denoiser_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One call on diffusers-named inputs (FluxTransformer2DModel's keyword arguments)."""
    return model(inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"],
                 inputs["pooled_projections"], inputs["img_ids"], inputs["txt_ids"], inputs.get("guidance"))


def bench_inputs(name: str, config: dict, shape: BenchShape, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Random denoiser inputs at `shape`, drawn on the CPU, ids as the pipeline makes them; guidance stays float32
    as the pipeline passes it."""
    g = torch.Generator("cpu").manual_seed(shape.seed)
    h, w = shape.height // 16, shape.width // 16  # VAE /8, then 2x2 packing
    return dict(
        hidden_states=torch.randn(shape.batch, h * w, config["in_channels"], generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(shape.batch, shape.text_tokens, config["joint_attention_dim"],
                                          generator=g).to(device, dtype),
        pooled_projections=torch.randn(shape.batch, config["pooled_projection_dim"], generator=g).to(device, dtype),
        timestep=torch.full([shape.batch], 0.75).to(device, dtype), guidance=torch.full([shape.batch], 3.5, device=device),
        img_ids=image_ids(h, w).to(device, dtype), txt_ids=torch.zeros(shape.text_tokens, 3).to(device, dtype),
    )


class Flux1SequenceParallel(SequenceParallelTransformer):
    """FLUX.1: joint sequence [text | image] in both block kinds; RoPE tables from cat(txt_ids, img_ids)."""

    text_first = True
    text_shardable = True  # text tokens go through per-token layers only, and FLUX.1 never masks them

    def __init__(self, inner: nn.Module, mesh):
        heads = inner.config.num_attention_heads
        if heads % mesh.ulysses.size:
            raise ValueError(f"Ulysses degree {mesh.ulysses.size} must divide FLUX.1's {heads} attention heads")
        super().__init__(inner, mesh)

    def forward(self, img, txt, timestep, pooled, img_ids, txt_ids, guidance=None):
        return self.run_sharded(img, img_ids, txt.shape[1], lambda x, ids, t, t_ids: self.inner(
            x, t, timestep, pooled, ids, t_ids, guidance), text=(txt, txt_ids))


FAMILY = Family(
    name="flux1", diffusers_pipeline="FluxPipeline", sampling=FluxSampling, denoisers=("transformer",),
    pipeline=Flux1Pipeline, denoiser_builder=denoiser_builder, denoiser_forward=denoiser_forward,
    bench_inputs=bench_inputs, sequence_parallel=Flux1SequenceParallel,
    conditioning=("encoder_hidden_states", "pooled_projections", "negative.encoder_hidden_states",
                  "negative.pooled_projections"),  # T5 tokens, CLIP pooled; both branches of true CFG
)
