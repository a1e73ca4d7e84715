"""FLUX.1 in the zoo: size table and the writer of a diffusers-format folder that `FluxPipeline.from_pretrained`
loads offline with no missing or unexpected keys.

Every model is built on the meta device only to read its key names and shapes; the weights come from `synth`, and
configs are written by the libraries' own serializers so that loading sees exactly what it expects.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from harness.zoo import synth, tokenizers

SIZES = ("tiny", "full")
# tiny runs on CPU in tests (fp32 on disk); full is the real FLUX.1-dev geometry, stored in bf16 like the release.
STORAGE_DTYPE = {"tiny": torch.float32, "full": torch.bfloat16}

TRANSFORMER = {
    "tiny": dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                 guidance_embeds=True, axes_dims_rope=[8, 12, 12]),
    "full": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=[16, 56, 56]),
}
VAE = {
    # vae_scale_factor 2: a 64x64 image is 32x32x4 latents, packed 2x2 into 256 tokens of 16 channels.
    "tiny": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                 latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
    "full": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                 latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False, act_fn="silu", force_upcast=True),
}
CLIP = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 vocab_size=tokenizers.CLIP_VOCAB_SIZE, max_position_embeddings=77, projection_dim=32,
                 hidden_act="quick_gelu", bos_token_id=tokenizers.CLIP_BOS_ID, eos_token_id=tokenizers.CLIP_EOS_ID,
                 pad_token_id=tokenizers.CLIP_EOS_ID),
    # CLIP-L as shipped in FLUX.1-dev, including its legacy special ids 0/2/1: with eos_token_id == 2 transformers
    # pools at argmax(input_ids), the real <|endoftext|> (49407) position, so pooling matches the tiny config's.
    "full": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=tokenizers.CLIP_VOCAB_SIZE, max_position_embeddings=77, projection_dim=768,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
}
T5 = {
    # vocab_size None: the synthetic T5 tokenizer's size. Few buckets: 512 tokens do not need 32.
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=None,
                 relative_attention_num_buckets=8, relative_attention_max_distance=32),
    # google/t5-v1_1-xxl encoder. The synthetic tokenizer has ~3.3k pieces; ids stay inside the 32128 rows.
    "full": dict(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128),
}
T5_COMMON = dict(feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=True,
                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)

# adaLN modulation linears read silu(temb) (std ~0.4) and carry no outlier columns: one dominant temb channel would
# make every gate follow it. Gain 1 gives shift/scale/gate std ~0.4: each block moves the residual stream by 10-50% of
# its std and 19+38 blocks grow it from 1.1 to 3.7 (measured, full size, 1024px, H100; gain 0.5 gave 8-14% updates,
# a near-identity stack in which block bugs hardly reach the output).
MODULATION_GAIN = 1.0


DENOISERS = ("transformer",)


def _check(size: str, denoiser: str = "transformer") -> None:
    if size not in SIZES:
        raise ValueError(f"unknown flux1 size {size!r}; valid sizes: {', '.join(SIZES)}")
    if denoiser not in DENOISERS:
        raise ValueError(f"flux1 has no denoiser {denoiser!r}; valid: {list(DENOISERS)}")


def transformer_config(size: str, denoiser: str = "transformer") -> dict:
    """The FluxTransformer2DModel constructor arguments of `size` (a copy: callers may edit it)."""
    _check(size, denoiser)
    return json.loads(json.dumps(TRANSFORMER[size]))


def _gain(name: str, kind: str) -> float:
    if kind == synth.LINEAR_PLAIN and any(p in name for p in synth.MODULATION_PATTERNS):
        return MODULATION_GAIN
    return 1.0


def _t5_gain(d_kv: int):
    # T5 attention has no 1/sqrt(d_kv) on its logits: the release folds it into q's init, and so do we.
    def gain(name: str, kind: str) -> float:
        return d_kv ** -0.5 if name.endswith("SelfAttention.q.weight") else 1.0
    return gain


def _meta(build):
    with torch.device("meta"):
        return build()


def transformer_specs(size: str, denoiser: str = "transformer", sensitive_layer: str | None = None
                      ) -> list[synth.ParamSpec]:
    from diffusers import FluxTransformer2DModel

    model = _meta(lambda: FluxTransformer2DModel(**transformer_config(size, denoiser)))
    specs = synth.specs_from_module(model, _gain)
    return specs if sensitive_layer is None else _plant(specs, size, sensitive_layer)


# --- a deliberately quantization-sensitive layer ----------------------------------------------------------------------
# The MLP output projections and the linear whose input they feed alone: their input is gelu(fc1(x)), so a constant
# on one fc1 bias arrives unchanged on that input channel only (in single blocks after the dim attention channels).
SENSITIVE_LAYERS = {
    r"transformer_blocks\.(\d+)\.ff\.net\.2": r"transformer_blocks.\1.ff.net.0.proj",
    r"transformer_blocks\.(\d+)\.ff_context\.net\.2": r"transformer_blocks.\1.ff_context.net.0.proj",
    r"single_transformer_blocks\.(\d+)\.proj_out": r"single_transformer_blocks.\1.proj_mlp",
}
# The planted constant, ~2e6 times the median channel RMS of that input on the tiny zoo: under a per-token FP8 scale
# every other channel of a token falls below e4m3's smallest subnormal, and under NVFP4's per-tensor activation scale
# most block scales do. Measured on transformer_blocks.1.ff.net.2 (tiny, bf16): the layer's own output SQNR falls
# from ~29 to 0.5 dB (fp8) and from ~17 to 2.1 dB (nvfp4); 2**18 left 10-11 dB, and nvfp4 then ranked it 4th.
MASSIVE_ACTIVATION = 2.0**20


def _plant(specs: list[synth.ParamSpec], size: str, layer: str) -> list[synth.ParamSpec]:
    for pattern, producer in SENSITIVE_LAYERS.items():
        if re.fullmatch(pattern, layer):
            cfg = TRANSFORMER[size]
            dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
            offset = dim if layer.startswith("single_") else 0  # proj_out reads [attention | mlp]
            channel = synth.name_seed(0, layer) % (4 * dim)  # the MLP is 4 x dim wide
            return synth.plant_massive_activation(specs, re.sub(pattern, producer, layer), layer, channel,
                                                  MASSIVE_ACTIVATION, offset)
    raise ValueError(f"flux1 cannot make {layer!r} sensitive; valid: names matching {sorted(SENSITIVE_LAYERS)}, "
                     "e.g. transformer_blocks.0.ff.net.2")


def _t5_config(size: str, vocab_size: int):
    from transformers import T5Config

    kw = dict(T5[size], **T5_COMMON)
    kw["vocab_size"] = kw["vocab_size"] or vocab_size
    config = T5Config(**kw)
    config.architectures = ["T5EncoderModel"]
    return config


def write(folder: Path, size: str, seed: int, dtype: torch.dtype | None = None, sensitive_layer: str | None = None
          ) -> None:
    """Write every FluxPipeline component of `size` into the existing empty `folder`; `sensitive_layer` (a
    diffusers module name) plants a massive activation on that layer's input (see transformer_specs)."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    _check(size)
    dtype = dtype or STORAGE_DTYPE[size]
    folder = Path(folder)

    t5_tok = tokenizers.write_t5_tokenizer(folder / "tokenizer_2")
    tokenizers.write_clip_tokenizer(folder / "tokenizer")

    for sub, cls, kw, gain in (("transformer", FluxTransformer2DModel, transformer_config(size), _gain),
                               ("vae", AutoencoderKL, VAE[size], None)):
        model = _meta(lambda: cls(**kw))
        (folder / sub).mkdir()
        model.save_config(folder / sub)
        specs = synth.specs_from_module(model, gain)
        if sub == "transformer" and sensitive_layer is not None:
            specs = _plant(specs, size, sensitive_layer)
        synth.write_safetensors(specs, seed, sub, folder / sub, "diffusion_pytorch_model", dtype)

    clip_config = CLIPTextConfig(**CLIP[size])
    clip_config.architectures = ["CLIPTextModel"]
    t5_config = _t5_config(size, len(t5_tok))
    for sub, cls, config, gain in (("text_encoder", CLIPTextModel, clip_config, None),
                                   ("text_encoder_2", T5EncoderModel, t5_config, _t5_gain(t5_config.d_kv))):
        config.dtype = dtype
        model = _meta(lambda: cls(config))
        config.save_pretrained(folder / sub)
        synth.write_safetensors(synth.specs_from_module(model, gain), seed, sub, folder / sub, "model", dtype)

    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_config(folder / "scheduler")
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def denoiser_inputs(size: str, denoiser: str, prompt_seeds: list[int], seed: int, height: int, width: int,
                    text_tokens: int, sampling) -> dict[str, torch.Tensor]:
    """Step-0 inputs of the transformer (diffusers names, float32, CPU) without running the text encoders: for
    full-size runs whose weights are synthesized on the device, where no encoder exists. Latent noise is drawn from
    `seed` as the pipeline draws it; each prompt's text conditioning from its own seed in `prompt_seeds`, N(0, 1) like
    the zoo encoders' layer-normed outputs. Timestep 1: the first step of every FLUX.1 schedule; guidance from the
    family's sampling object."""
    _check(size)
    if denoiser != "transformer":
        raise ValueError(f"flux1 has one denoiser, 'transformer'; got {denoiser!r}")
    cfg = TRANSFORMER[size]
    h2, w2 = height // 16, width // 16  # VAE /8, then 2x2 packing
    noise = torch.randn(len(prompt_seeds), h2 * w2, cfg["in_channels"], generator=torch.Generator().manual_seed(seed))
    texts = [torch.Generator().manual_seed(s) for s in prompt_seeds]
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h2)[:, None], torch.arange(w2)[None, :]
    return dict(
        hidden_states=noise,
        encoder_hidden_states=torch.stack([torch.randn(text_tokens, cfg["joint_attention_dim"], generator=g)
                                           for g in texts]),
        pooled_projections=torch.stack([torch.randn(cfg["pooled_projection_dim"], generator=g) for g in texts]),
        timestep=torch.ones(len(prompt_seeds)), guidance=torch.full([len(prompt_seeds)], float(sampling.guidance)),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_tokens, 3),
    )


def pipeline_components(size: str, seed: int, device, dtype: torch.dtype) -> dict:
    """Every FluxPipeline component except the denoiser, built in memory with `write`'s weights synthesized directly
    on `device` (no folder; a full-size T5-XXL is 9.5 GB in bf16): tokenizers and text encoders as transformers
    objects, the VAE as diffusers', the scheduler as its config dict. On CPU in float32 they equal what `write` puts
    in a folder for the same (size, seed)."""
    import tempfile

    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    _check(size)
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizers load from files: a few MB, gone once loaded
        t5_tok = tokenizers.write_t5_tokenizer(Path(tmp) / "tokenizer_2")
        clip_tok = tokenizers.write_clip_tokenizer(Path(tmp) / "tokenizer")
    clip_config = CLIPTextConfig(**CLIP[size])
    t5_config = _t5_config(size, len(t5_tok))
    encoders = {}
    for sub, cls, config, gain in (("text_encoder", CLIPTextModel, clip_config, None),
                                   ("text_encoder_2", T5EncoderModel, t5_config, _t5_gain(t5_config.d_kv))):
        specs = synth.specs_from_module(_meta(lambda: cls(config)), gain)
        state = synth.synthesize(specs, seed, sub, device=device, dtype=dtype)
        # transformers' own loader ties T5's embeddings and fills CLIP's position_ids buffer, as from a folder. It
        # places weights on the CPU (keeping them on the GPU takes a device_map, which needs accelerate): a full-size
        # T5 round-trips once, seconds, once per bench run.
        encoders[sub] = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype).to(device).eval()
        del state
    vae = _meta(lambda: AutoencoderKL(**VAE[size]))
    vae.load_state_dict(synth.synthesize(synth.specs_from_module(vae), seed, "vae", device=device, dtype=dtype),
                        assign=True, strict=True)
    return dict(tokenizer=clip_tok, tokenizer_2=t5_tok, **encoders, vae=vae.eval().requires_grad_(False),
                scheduler=dict(SCHEDULER))
