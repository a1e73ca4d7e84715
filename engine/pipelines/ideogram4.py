"""Ideogram 4 text-to-image: Qwen3-VL language-model features from the tapped decoder layers (concatenated per token,
the final norm never applied), a conditional transformer on the packed [left-pad | text | image] sequence and an
unconditional transformer on the image tokens alone (zero text features), blended every step as
v = g v_pos + (1 - g) v_neg with g from the preset's per-step guidance schedule, Euler steps on the logit-normal
schedule (engine/sampling/logit_normal.py), and AutoencoderKLFlux2 after the latents are de-normalized with its
batch-norm statistics and unpatched.

Latents travel as (B, H/16 * W/16, 4 C_ae) tokens, the transformers' own layout, in float32; the sampler steps with
-v (diffusers' sigma runs the other way from the model's time t = 1 - sigma).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from engine.api import Artifacts, RunConfig, guided_inputs, split_guided
from engine.denoisers import load_denoiser, summary
from engine.family import BenchShape, Family, QuantizedComponent
from engine.models.ideogram4 import (IMAGE_INDICATOR, IMAGE_POSITION_OFFSET, PADDING_INDICATOR, TEXT_INDICATOR,
                                     Ideogram4Config, Ideogram4Transformer, PackedLayout, diffusers_key_map,
                                     packed_layout, rope_tables)
from engine.parallel.transformer import SequenceParallelTransformer
from engine.pipeline import denoise_loop, serial_cfg, to_uint8_images
from engine.quant.api import QuantSpec
from engine.quant.component import load_component
from engine.sampling.flow_match import dynamic_shift_sigmas
from engine.sampling.logit_normal import guide, logit_normal_sigmas

PATCH = 2  # the pipeline's 2x2 patches of the VAE latent


@dataclass(frozen=True)
class Preset:
    """A named sampler preset: step count, schedule mean and spread, and the per-step guidance weights (g in
    v = g v_pos + (1 - g) v_neg): `main` for the first steps, then `polish` for the last `polish_steps`."""

    steps: int
    mu: float
    std: float
    polish_steps: int
    main: float = 7.0
    polish: float = 3.0

    def guidance(self) -> tuple[float, ...]:
        return (self.main,) * (self.steps - self.polish_steps) + (self.polish,) * self.polish_steps


# ideogram-oss/ideogram4 docs/inference.md (V4_QUALITY_48 is also diffusers' Ideogram4Pipeline default).
PRESETS: dict[str, Preset] = {
    "quality-48": Preset(steps=48, mu=0.0, std=1.5, polish_steps=3),
    "default-20": Preset(steps=20, mu=0.0, std=1.75, polish_steps=2),
    "turbo-12": Preset(steps=12, mu=0.5, std=1.75, polish_steps=1),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Ideogram 4 sampler preset {name!r}; valid: {sorted(PRESETS)}") from None


def tapped_layers(num_layers: int) -> tuple[int, ...]:
    """The text encoder layers whose outputs are concatenated: every third from 0, plus the last (36 layers:
    0, 3, ..., 33, 35, the 13 of the release)."""
    return tuple(range(0, num_layers - 1, 3)) + (num_layers - 1,)


@dataclass(frozen=True)
class Ideogram4Sampling:
    """Ideogram4Pipeline's sampling parameters. `preset` names the schedule mean and spread and the per-step guidance
    (engine/sampling/logit_normal.py PRESETS); the run's steps must be the preset's. guidance_scale, when set,
    replaces the preset's guidance schedule by a constant (diffusers' guidance_scale)."""

    preset: str = "quality-48"
    guidance_scale: float | None = None
    max_sequence_length: int = 2048

    def __post_init__(self) -> None:
        preset(self.preset)
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")

    @property
    def true_cfg(self) -> bool:
        return True  # two transformers every step

    def guidance(self) -> tuple[float, ...]:
        p = preset(self.preset)
        return (float(self.guidance_scale),) * p.steps if self.guidance_scale is not None else p.guidance()


def packed_ids(text_lengths: list[int], grid: tuple[int, int], max_text: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(position_ids (B, T + N, 3), segment_ids (B, T + N), indicator (B, T + N)) of the packed
    [left-pad | text | image] sequence, T = max_text, N = grid h x w."""
    gh, gw = grid
    h, w = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)
    image_pos = torch.stack([torch.zeros_like(h), h, w], 1) + IMAGE_POSITION_OFFSET
    b, total = len(text_lengths), max_text + gh * gw
    pos = torch.zeros(b, total, 3, dtype=torch.long)
    seg = torch.full((b, total), PADDING_INDICATOR, dtype=torch.long)
    ind = torch.zeros(b, total, dtype=torch.long)
    for i, n in enumerate(text_lengths):
        start = max_text - n
        pos[i, start:max_text] = torch.arange(n)[:, None]
        pos[i, max_text:] = image_pos
        ind[i, start:max_text] = TEXT_INDICATOR
        ind[i, max_text:] = IMAGE_INDICATOR
        seg[i, start:] = 1
    return pos, seg, ind


def unconditional_inputs(cond: Mapping[str, torch.Tensor], max_text: int) -> dict[str, torch.Tensor]:
    """The unconditional transformer's inputs from the conditional ones: the image region only, zero text."""
    image = cond["hidden_states"][:, max_text:]
    feats = cond["encoder_hidden_states"]
    return dict(hidden_states=image, timestep=cond["timestep"],
                encoder_hidden_states=feats.new_zeros(image.shape[0], image.shape[1], feats.shape[-1]),
                position_ids=cond["position_ids"][:, max_text:], segment_ids=cond["segment_ids"][:, max_text:],
                indicator=cond["indicator"][:, max_text:])


class Ideogram4Pipeline:
    family = "ideogram4"
    denoisers = ("transformer", "unconditional_transformer")

    def __init__(self, cfg: RunConfig):
        t0 = time.perf_counter()
        root = Path(cfg.model_dir)
        if not (root / "model_index.json").is_file():
            raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
        self.model_cfg = cfg
        self.dtype, self.device = cfg.torch_dtype, torch.device(cfg.device)
        # Deferred: the registry imports this module, and text encoders and the VAE are needed only to run.
        from diffusers import AutoencoderKLFlux2
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        spec = QuantSpec(cfg.quant, cfg.quant_ignored)
        # A plain folder: transformers' own load. The FP8 release layout: its decoder linears in e4m3 (see TEXT_ENCODER).
        self.text_encoder = load_component(TEXT_ENCODER, root / "text_encoder", spec, self.dtype, self.device)
        self.vae = AutoencoderKLFlux2.from_pretrained(root / "vae", dtype=self.dtype).to(self.device).eval()
        self.scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        for name in self.denoisers:
            model, _ = load_denoiser(FAMILY, name, root / name, spec, self.dtype, self.device)
            setattr(self, name, model)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.cfg_executor = serial_cfg  # CFG parallelism puts the two transformers on different ranks
        self.load_seconds = time.perf_counter() - t0

    # --- conditioning -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], max_text: int) -> tuple[torch.Tensor, list[int]]:
        """((B, max_text, layers x hidden) float32 features, left-padded with zeros; the text lengths)."""
        ids = torch.zeros(len(prompts), max_text, dtype=torch.long)
        mask = torch.zeros_like(ids)
        positions = torch.zeros_like(ids)
        lengths = []
        for i, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            toks = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            n = len(toks)
            if n > max_text:
                raise ValueError(f"prompt {i} has {n} tokens, more than max_sequence_length={max_text}")
            lengths.append(n)
            ids[i, max_text - n:], mask[i, max_text - n:], positions[i, max_text - n:] = toks, 1, torch.arange(n)
        lm = self.text_encoder.language_model
        taps = tapped_layers(len(lm.layers))
        captured: dict[int, torch.Tensor] = {}
        hooks = [lm.layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o)) for i in taps]
        try:
            lm(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
               position_ids=positions.to(self.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        feats = torch.stack([captured[i] for i in taps], -1).flatten(2)  # per token (hidden, layer), layer fastest
        feats = feats * mask.to(self.device, feats.dtype)[..., None]
        return feats.float(), lengths

    def grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * PATCH
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        return height // f, width // f

    def initial_latents(self, batch: int, n: int, seed: int) -> torch.Tensor:
        """float32 noise (B, N, C) drawn on the CPU from one seeded generator (identical on every device and to the
        reference)."""
        shape = (batch, n, self.transformer.config.in_channels)
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).to(self.device)

    def decode(self, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        bn = self.vae.bn
        z = latents * torch.sqrt(bn.running_var + self.vae.config.batch_norm_eps).view(1, 1, -1).to(latents.dtype) \
            + bn.running_mean.view(1, 1, -1).to(latents.dtype)
        b, (gh, gw), c = z.shape[0], grid, z.shape[-1] // PATCH ** 2
        z = z.view(b, gh, gw, PATCH, PATCH, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, gh * PATCH, gw * PATCH)
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()  # as the reference postprocesses

    # --- the denoisers ------------------------------------------------------------------------------------------
    def branches(self, cond: Mapping[str, torch.Tensor], max_text: int,
                 layouts: tuple[PackedLayout | None, PackedLayout | None] = (None, None)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(v_pos, v_neg) float32 on the image tokens: the conditional transformer on the packed sequence, the
        unconditional one on the image region with zero text. `layouts`: each branch's, when known on the host."""
        uncond = unconditional_inputs(cond, max_text)
        return self.cfg_executor(lambda: denoiser_forward(self.transformer, cond, layouts[0])[:, max_text:].float(),
                                 lambda: denoiser_forward(self.unconditional_transformer, uncond, layouts[1]).float())

    @torch.no_grad()
    def transformer_forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One step's sampler velocity -(g v_pos + (1 - g) v_neg) on the reference's recorded inputs of both
        transformers; the conditional transformer's image tokens alone when the inputs hold one branch."""
        cond, negative, weight = split_guided({k: v.to(self.device) for k, v in inputs.items()})
        if negative is None:
            out = denoiser_forward(self.transformer, cond).float()
            return -out[cond["indicator"] == IMAGE_INDICATOR].view(out.shape[0], -1, out.shape[-1])
        max_text = cond["hidden_states"].shape[1] - negative["hidden_states"].shape[1]
        pos, neg = self.cfg_executor(lambda: denoiser_forward(self.transformer, cond)[:, max_text:].float(),
                                     lambda: denoiser_forward(self.unconditional_transformer, negative).float())
        return -guide(pos, neg, weight)

    @torch.no_grad()
    def generate(self, cfg: RunConfig) -> Artifacts:
        self.model_cfg.check_same_model(cfg)
        s: Ideogram4Sampling = cfg.sampling
        p = preset(s.preset)
        if cfg.steps != p.steps:
            raise ValueError(f"sampler preset {s.preset!r} has {p.steps} steps, the run asks for {cfg.steps}; "
                             f"preset steps: { {k: v.steps for k, v in PRESETS.items()} }")
        weights = s.guidance()
        prompts, max_text = list(cfg.prompts), s.max_sequence_length
        batch = len(prompts)
        grid = self.grid(cfg.height, cfg.width)
        feats, lengths = self.encode_prompt(prompts, max_text)
        n = grid[0] * grid[1]
        pos, seg, ind = packed_ids(lengths, grid, max_text)
        # Read on the host ids, once: the steps then never wait for the device to learn them.
        layouts = (packed_layout(seg, ind), packed_layout(seg[:, max_text:], ind[:, max_text:]))
        pos, seg, ind = (t.to(self.device) for t in (pos, seg, ind))
        feats = torch.cat([feats, feats.new_zeros(batch, n, feats.shape[-1])], 1).to(self.dtype)
        latents = self.initial_latents(batch, n, cfg.seed)
        sigmas = dynamic_shift_sigmas(cfg.steps, n, self.scheduler_config,
                                      logit_normal_sigmas(cfg.steps, p.mu, p.std, cfg.height, cfg.width)[:-1].numpy())
        train_steps = self.scheduler_config.get("num_train_timesteps", 1000)
        timesteps = (sigmas[:-1] * train_steps).to(self.device)
        pad = torch.zeros(batch, max_text, latents.shape[-1], device=self.device)
        step0: dict[str, torch.Tensor] = {}

        def predict(x, i, _t):
            t = (1.0 - timesteps[i].float() / train_steps).expand(batch).to(self.dtype)
            cond = dict(hidden_states=torch.cat([pad, x], 1).to(self.dtype), timestep=t, encoder_hidden_states=feats,
                        position_ids=pos, segment_ids=seg, indicator=ind)
            if i == 0:
                step0.update(guided_inputs(cond, unconditional_inputs(cond, max_text), weights[0]))
            v_pos, v_neg = self.branches(cond, max_text, layouts)
            return -guide(v_pos, v_neg, weights[i])

        t0 = time.perf_counter()
        initial = latents.detach().float().cpu()
        traj = denoise_loop(predict, latents, sigmas, train_steps)
        denoise_s = time.perf_counter() - t0
        decoded = self.decode(traj.final, grid)
        return Artifacts(
            initial_latents=initial, step_latents=traj.latents, step_outputs=traj.outputs,
            final_latents=traj.final.detach().float().cpu(), images=to_uint8_images(decoded),
            step0_inputs={k: v.detach().cpu() for k, v in step0.items()},
            extras={"load_s": self.load_seconds, "denoise_s": denoise_s, **summary(FAMILY, self)},
        )


# --- the family's hooks for generic code ---------------------------------------------------------------------------
def denoiser_builder(name: str, config: dict):
    cfg = Ideogram4Config.from_diffusers(config)
    return (lambda: Ideogram4Transformer(cfg)), diffusers_key_map(cfg)


def denoiser_forward(model: nn.Module, inputs: Mapping[str, torch.Tensor], layout: PackedLayout | None = None
                     ) -> torch.Tensor:
    """One call on diffusers-named inputs (hidden_states, timestep, encoder_hidden_states, position_ids,
    segment_ids, indicator); returns the (B, L, in_channels) output in the model dtype. `layout`: the inputs' packed
    layout when the caller read it already (None: the model reads it)."""
    return model(inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["position_ids"],
                 inputs["segment_ids"], inputs["indicator"], layout=layout)


def bench_inputs(name: str, config: dict, shape: BenchShape, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Random inputs at `shape`, drawn on the CPU: 1/16-size image tokens (the 8x VAE and the 2x2 patches); the
    conditional transformer also gets shape.text_tokens text tokens (no padding), the unconditional one none."""
    g = torch.Generator("cpu").manual_seed(shape.seed)
    grid = (shape.height // 16, shape.width // 16)
    text = 0 if name == "unconditional_transformer" else shape.text_tokens
    pos, seg, ind = packed_ids([text] * shape.batch, grid, text)
    total = pos.shape[1]
    feats = torch.randn(shape.batch, total, config["llm_features_dim"], generator=g) * (ind == TEXT_INDICATOR)[..., None]
    return dict(hidden_states=torch.randn(shape.batch, total, config["in_channels"], generator=g).to(device, dtype),
                timestep=torch.full([shape.batch], 0.25).to(device, dtype), encoder_hidden_states=feats.to(device, dtype),
                position_ids=pos.to(device), segment_ids=seg.to(device), indicator=ind.to(device))


class Ideogram4Parallel(SequenceParallelTransformer):
    """Ideogram 4: the joint sequence is [left-pad | text | image]; the text region (T tokens, pads included) is
    replicated on every rank and the image tokens are sharded with their RoPE rows (cos | sin, computed from the
    whole sequence's positions in float32 before the cut). Padding keys are masked through the SP attention's masked
    path (a key mask over the text region; every image key is real). The unconditional transformer has no text
    (T = 0): its image tokens alone are sharded."""

    text_first = True

    def __init__(self, inner: nn.Module, mesh):
        heads = inner.config.num_attention_heads
        if heads % mesh.ulysses.size:
            raise ValueError(f"Ulysses degree {mesh.ulysses.size} must divide Ideogram 4's {heads} attention heads")
        super().__init__(inner, mesh)
        if mesh.sp.size > 1:
            self.sp_attention.local_masked_attention = inner.masked_attention
            inner.masked_attention = self.sp_attention

    def forward(self, hidden_states, timestep, encoder_hidden_states, position_ids, segment_ids, indicator,
                layout: PackedLayout | None = None):
        # The layout (text length, mask or none) decides shapes and branches, so it is read on the host: once per
        # generation by the pipeline, which passes it; here, a synchronisation per call, only when nobody did.
        layout = layout or packed_layout(segment_ids, indicator)
        inner, text_len = self.inner, layout.text_len
        key_mask = (segment_ids != PADDING_INDICATOR) if layout.padded else None
        # The whole sequence is embedded on every rank exactly as the unwrapped model embeds it (per token, cheap;
        # a separately embedded window rounds differently in bf16). The embedded image tokens travel with their RoPE
        # rows through the shard plan; the raw latents are what run_sharded checks to be the same on every rank (both
        # CFG branches see the same latents; their embeddings differ).
        x = inner.embed(hidden_states, encoder_hidden_states, indicator, layout.text)
        adaln = inner.embed_time(timestep)
        cos, sin = rope_tables(position_ids, inner.config, x.dtype)
        head = cos.shape[-1]
        rows = torch.cat([cos, sin, x], -1)
        text_x, text_rows = x[:, :text_len], rows[:, :text_len, :2 * head]
        text_mask = None if key_mask is None else key_mask[:, :text_len]
        text_out: list[torch.Tensor] = []

        def call(_window, window_rows):
            window_rows = window_rows.transpose(0, 1)
            cs = torch.cat([text_rows, window_rows[..., :2 * head]], 1)
            mask = None if text_mask is None else torch.cat(
                [text_mask, text_mask.new_ones(text_mask.shape[0], window_rows.shape[1])], 1)
            if mask is not None and self.mesh.sp.size > 1:  # every image key True, as built
                self.sp_attention.vouch_for(mask)
            out = inner.core(torch.cat([text_x, window_rows[..., 2 * head:]], 1), cs[..., :head], cs[..., head:],
                             mask, adaln)
            text_out.append(out[:, :text_len])
            return out[:, text_len:]
        out = self.run_sharded(hidden_states[:, text_len:], rows[:, text_len:].transpose(0, 1), text_len, call)
        return torch.cat([text_out[0], out], 1)


def _release_quantizes(name: str) -> bool:
    """The text encoder linears the FP8 release layout stores in e4m3: the language model's decoder layers (attention
    and MLP projections, whose outputs at the tapped layers are the features). The token embedding and the norms are
    not linears and keep the checkpoint's tensors; the vision tower, which text-to-image never runs, is left as is."""
    return name.startswith("language_model.layers.")


TEXT_ENCODER = QuantizedComponent(folder="text_encoder", model_class="Qwen3VLModel", select=_release_quantizes,
                                  formats=("fp8-wo",))

FAMILY = Family(name="ideogram4", diffusers_pipeline="Ideogram4Pipeline", sampling=Ideogram4Sampling,
                denoisers=("transformer", "unconditional_transformer"), pipeline=Ideogram4Pipeline,
                denoiser_builder=denoiser_builder, denoiser_forward=denoiser_forward, bench_inputs=bench_inputs,
                sequence_parallel=Ideogram4Parallel, quantized_components=(TEXT_ENCODER,),
                # The tapped Qwen3-VL features; the unconditional transformer's text is zeros, made without the prompt.
                conditioning=("encoder_hidden_states",))
