"""FLUX.1 text-to-image: CLIP pooled + T5 sequence conditioning, 2x2-packed latents, guidance-distilled model
with optional true CFG (negative prompt and true_cfg_scale > 1)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from diffusers import AutoencoderKL
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from engine.api import Artifacts, RunConfig
from engine.loading import read_config
from engine.models.flux1 import Flux1Config, Flux1Transformer, diffusers_key_map
from engine.pipeline import denoise_loop, serial_cfg, to_uint8_images
from engine.quant.api import QuantSpec, build_transformer, quant_summary, select_linears
from engine.quant.names import packed_from_key_map
from engine.sampling.flow_match import flux_sigmas


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


def _check_denoiser(name: str) -> None:
    if name not in Flux1Pipeline.denoisers:
        raise ValueError(f"flux1 has no denoiser {name!r}; valid: {list(Flux1Pipeline.denoisers)}")


class Flux1Pipeline:
    family = "flux1"
    denoisers = ("transformer",)  # the denoiser components: folder names and attributes of a loaded pipeline

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        root = Path(cfg.model_dir)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
        self.model_cfg = cfg
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2")
        self.text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=self.dtype).to(self.device).eval()
        self.text_encoder_2 = T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=self.dtype).to(self.device).eval()
        self.vae = AutoencoderKL.from_pretrained(root / "vae", dtype=self.dtype).to(self.device).eval()
        self.scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.transformer, key_map = self.build_denoiser(root / "transformer", QuantSpec(cfg.quant, cfg.quant_ignored),
                                                        self.dtype, self.device)
        self.transformer_config = self.transformer.config
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.cfg_executor = serial_cfg  # how the two guidance branches run; CFG parallelism swaps it
        self.load_seconds = time.perf_counter() - t0

    @staticmethod
    def build_denoiser(component_dir: Path, spec: QuantSpec, dtype: torch.dtype, device) -> tuple[Flux1Transformer, dict]:
        """The (quantized) transformer of a folder and its checkpoint key map; also used for weight-level checks."""
        config = Flux1Config.from_diffusers(read_config(component_dir))
        key_map = diffusers_key_map(config)
        return build_transformer(lambda: Flux1Transformer(config), key_map, component_dir, spec, dtype, device), key_map

    @staticmethod
    def denoiser_parts(name: str, config: dict) -> tuple[Callable[[], nn.Module], dict]:
        """How to build denoiser `name` from its diffusers config on any device, and its checkpoint key map."""
        _check_denoiser(name)
        model_cfg = Flux1Config.from_diffusers(config)
        return (lambda: Flux1Transformer(model_cfg)), diffusers_key_map(model_cfg)

    @staticmethod
    def denoiser_call(name: str, inputs: Mapping[str, torch.Tensor]) -> tuple:
        """Denoiser `name`'s positional arguments for diffusers-named step-0 inputs (what the reference receives)."""
        _check_denoiser(name)
        return tuple(inputs.get(k) for k in ("hidden_states", "encoder_hidden_states", "timestep", "pooled_projections",
                                             "img_ids", "txt_ids", "guidance"))

    @staticmethod
    def check_quant_spec(component_dir: Path, spec: QuantSpec) -> None:
        """Fail before any work if the spec cannot apply (an ignored-layer pattern that matches nothing, a
        layer shape the format cannot take): built on the meta device, so it costs no memory."""
        config = Flux1Config.from_diffusers(read_config(component_dir))
        with torch.device("meta"):
            model = Flux1Transformer(config)
        select_linears(model, spec, packed_from_key_map(diffusers_key_map(config), None))

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
        """One denoiser call on diffusers-named inputs (what the reference's transformer receives)."""
        to = lambda x: None if x is None else x.to(self.device)  # noqa: E731
        return self.transformer(
            to(inputs["hidden_states"]), to(inputs["encoder_hidden_states"]), to(inputs["timestep"]),
            to(inputs["pooled_projections"]), to(inputs["img_ids"]), to(inputs["txt_ids"]), to(inputs.get("guidance")),
        )

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        for key in ("model_dir", "dtype", "device", "quant", "quant_ignored", "parallel"):
            if getattr(cfg, key) != getattr(self.model_cfg, key):
                raise ValueError(f"runner was loaded for {key}={getattr(self.model_cfg, key)!r}, asked for {getattr(cfg, key)!r}")
        prompts = list(cfg.prompts)
        batch = len(prompts)
        embeds, pooled, txt_ids = self.encode_prompt(prompts, cfg.max_sequence_length)
        do_cfg = cfg.true_cfg_scale > 1 and cfg.negative_prompt is not None
        if do_cfg:
            neg_embeds, neg_pooled, neg_txt_ids = self.encode_prompt([cfg.negative_prompt] * batch, cfg.max_sequence_length)
        h, w = self.latent_size(cfg.height, cfg.width)
        latents = self.initial_latents(batch, cfg.height, cfg.width, cfg.seed)
        img_ids = image_ids(h // 2, w // 2).to(device=self.device, dtype=self.dtype)
        guidance = (torch.full([batch], cfg.guidance, device=self.device, dtype=torch.float32)
                    if self.transformer_config.guidance_embeds else None)
        sigmas = flux_sigmas(cfg.steps, latents.shape[1], self.scheduler_config)
        step0: dict[str, torch.Tensor] = {}

        def predict(x, i, t):
            if i == 0:
                step0.update(hidden_states=x.clone(), timestep=t.clone(), guidance=guidance, pooled_projections=pooled,
                             encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids)
            if not do_cfg:
                return self.transformer(x, embeds, t, pooled, img_ids, txt_ids, guidance)
            v, v_neg = self.cfg_executor(
                lambda: self.transformer(x, embeds, t, pooled, img_ids, txt_ids, guidance),
                lambda: self.transformer(x, neg_embeds, t, neg_pooled, img_ids, neg_txt_ids, guidance),
            )
            return v_neg + cfg.true_cfg_scale * (v - v_neg)

        t0 = time.perf_counter()
        initial = latents.detach().float().cpu()
        traj = denoise_loop(predict, latents, sigmas, self.scheduler_config.get("num_train_timesteps", 1000))
        denoise_s = time.perf_counter() - t0
        decoded = self.vae.decode(self.decode_input(traj.final, h, w), return_dict=False)[0]
        return Artifacts(
            initial_latents=initial, step_latents=traj.latents, step_outputs=traj.outputs,
            final_latents=traj.final.detach().float().cpu(), images=to_uint8_images(decoded),
            step0_inputs={k: v.detach().cpu() for k, v in step0.items() if v is not None},
            extras={"load_s": self.load_seconds, "denoise_s": denoise_s, **quant_summary(self.transformer)},
        )

    def decode_input(self, latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
        cfg = self.vae.config
        return unpack_latents(latents, h, w) / cfg.scaling_factor + cfg.shift_factor
