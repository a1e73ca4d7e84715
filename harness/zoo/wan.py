"""Wan 2.2 in the zoo: the A14B text-to-video pipeline (two experts, `transformer` for high noise and `transformer_2`
for low noise, switched at boundary_ratio) and TI2V-5B (one expert, per-token timesteps, its own 48-channel VAE).
Size tables and the writer of diffusers-format folders that `WanPipeline.from_pretrained` (A14B) and
`WanImageToVideoPipeline.from_pretrained` (TI2V) load offline with no missing or unexpected keys.

Tiny sizes, and why they look the way they do:
  - transformer: diffusers' own test config (ANCHORS section 1) with 4 heads of 16 (dim 64) instead of 2 of 12,
    so sequence-parallel cells can split heads over 2 and 4 ranks and every quant format reaches a layer (NVFP4
    needs in_features % 16, MXFP4 % 32 and >= 256 outputs: ffn_dim 256 gives the feed-forward's first linear),
    and text_dim 32 (the tiny UMT5's width). The two A14B experts share one config and differ in weights (each
    folder is its own synthesis namespace).
  - VAE: A14B's AutoencoderKLWan with base_dim 3 and one res block per level (diffusers' test geometry, 16 latent
    channels, 8x spatial and 4x temporal compression); TI2V's Wan 2.2 VAE (is_residual, patch 2, 16x spatial, 48
    latent channels) at base_dim 8. Latent normalization is the identity for TI2V's 48 channels (the released
    mean/std lists are not reproduced here).
  - text encoder: a 2-layer UMT5 encoder of width 32 over the zoo's synthetic T5 tokenizer.
  - scheduler: UniPC in flow-prediction mode. flow_shift 12 for the tiny A14B puts the expert switch (boundary
    0.875) inside a 3-step run (timesteps 999, 960, 857); TI2V-5B's released value is 5.0.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from harness.zoo import synth, tokenizers

SIZES = ("tiny", "full")
STORAGE_DTYPE = {"tiny": torch.float32, "full": torch.bfloat16}

TINY_TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=16, in_channels=16,
                        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
# Wan-AI/Wan2.2-T2V-A14B-Diffusers (each expert) and Wan-AI/Wan2.2-TI2V-5B-Diffusers.
FULL_TRANSFORMER = dict(patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                        cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
VARIANTS = {
    "a14b": dict(
        pipeline="WanPipeline", denoisers=("transformer", "transformer_2"), boundary_ratio=0.875,
        expand_timesteps=False, flow_shift={"tiny": 12.0, "full": 12.0},
        transformer={"tiny": TINY_TRANSFORMER, "full": FULL_TRANSFORMER},
        vae={"tiny": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                          temperal_downsample=[False, True, True]),
             "full": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                          temperal_downsample=[False, True, True])}),
    "ti2v": dict(
        pipeline="WanImageToVideoPipeline", denoisers=("transformer",), boundary_ratio=None, expand_timesteps=True,
        flow_shift={"tiny": 5.0, "full": 5.0},
        transformer={"tiny": dict(TINY_TRANSFORMER, in_channels=48, out_channels=48),
                     "full": dict(FULL_TRANSFORMER, num_attention_heads=24, in_channels=48, out_channels=48,
                                  ffn_dim=14336, num_layers=30)},
        vae={"tiny": dict(base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                          temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                          patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48),
             "full": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                          temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                          out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48,
                          latents_std=[1.0] * 48)}),
}
TEXT = {
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    # google/umt5-xxl encoder.
    "full": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
                 vocab_size=256384),
}
TEXT_COMMON = dict(feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False, pad_token_id=0,
                   eos_token_id=1)
EMBEDDERS = ("condition_embedder", "scale_shift_table")  # no outliers (see harness/zoo/flux1.py MODULATION_GAIN)


def _meta(build):
    with torch.device("meta"):
        return build()


def _t5_gain(d_kv: int):
    # T5 attention has no 1/sqrt(d_kv) on its logits: the release folds it into q's init, and so do we.
    def gain(name: str, kind: str) -> float:
        return d_kv ** -0.5 if name.endswith("SelfAttention.q.weight") else 1.0
    return gain


class WanZoo:
    """One zoo family (the interface harness/zoo/__init__.py documents)."""

    SIZES = SIZES
    STORAGE_DTYPE = STORAGE_DTYPE

    def __init__(self, variant: str):
        self.variant = variant
        self.spec = VARIANTS[variant]

    def _check(self, size: str, denoiser: str = "transformer") -> None:
        if size not in SIZES:
            raise ValueError(f"unknown wan size {size!r}; valid sizes: {', '.join(SIZES)}")
        if denoiser not in self.spec["denoisers"]:
            raise ValueError(f"wan-{self.variant} has denoisers {list(self.spec['denoisers'])}; got {denoiser!r}")

    def transformer_config(self, size: str, denoiser: str = "transformer") -> dict:
        self._check(size, denoiser)
        return json.loads(json.dumps(self.spec["transformer"][size]))

    def transformer_specs(self, size: str, denoiser: str = "transformer", sensitive_layer: str | None = None
                          ) -> list[synth.ParamSpec]:
        from diffusers import WanTransformer3DModel

        if sensitive_layer is not None:
            raise ValueError(f"the wan zoo cannot plant a sensitive layer ({sensitive_layer!r}); valid: none")
        model = _meta(lambda: WanTransformer3DModel(**self.transformer_config(size, denoiser)))
        return [dataclasses.replace(s, kind=synth.LINEAR_PLAIN)
                if s.kind == synth.LINEAR and any(p in s.name for p in EMBEDDERS) else s
                for s in synth.specs_from_module(model)]

    def denoiser_inputs(self, size: str, denoiser: str, prompt_seeds: list[int], seed: int, height: int, width: int,
                        text_tokens: int, sampling) -> dict[str, torch.Tensor]:
        """Step-0 inputs without the text encoder: latent noise from `seed` as the pipeline draws it (latent frames
        from sampling.num_frames), each prompt's text from its own seed, N(0, 1); the first timestep of a 1000-step
        schedule (999)."""
        config = self.transformer_config(size, denoiser)
        spatial = 16 if self.spec["expand_timesteps"] else 8
        frames = (sampling.num_frames - 1) // 4 + 1
        x = torch.randn(len(prompt_seeds), config["in_channels"], frames, height // spatial, width // spatial,
                        generator=torch.Generator().manual_seed(seed))
        text = torch.stack([torch.randn(text_tokens, config["text_dim"], generator=torch.Generator().manual_seed(s))
                            for s in prompt_seeds])
        return dict(hidden_states=x, timestep=torch.full([len(prompt_seeds)], 999), encoder_hidden_states=text)

    def write(self, folder: Path, size: str, seed: int, dtype: torch.dtype | None = None,
              sensitive_layer: str | None = None) -> None:
        import diffusers
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        self._check(size)
        if sensitive_layer is not None:
            raise ValueError(f"the wan zoo cannot plant a sensitive layer ({sensitive_layer!r}); valid: none")
        dtype = dtype or STORAGE_DTYPE[size]
        folder = Path(folder)
        tok = tokenizers.write_t5_tokenizer(folder / "tokenizer")
        for sub in self.spec["denoisers"]:
            model = _meta(lambda: WanTransformer3DModel(**self.transformer_config(size, sub)))
            (folder / sub).mkdir()
            model.save_config(folder / sub)
            synth.write_safetensors(self.transformer_specs(size, sub), seed, sub, folder / sub,
                                    "diffusion_pytorch_model", dtype)
        vae = _meta(lambda: AutoencoderKLWan(**self.spec["vae"][size]))
        (folder / "vae").mkdir()
        vae.save_config(folder / "vae")
        synth.write_safetensors(synth.specs_from_module(vae), seed, "vae", folder / "vae", "diffusion_pytorch_model",
                                dtype)

        config = UMT5Config(**{"vocab_size": len(tok), **TEXT[size], **TEXT_COMMON})
        config.architectures = ["UMT5EncoderModel"]
        config.dtype = dtype
        model = _meta(lambda: UMT5EncoderModel(config))
        config.save_pretrained(folder / "text_encoder")
        synth.write_safetensors(synth.specs_from_module(model, _t5_gain(config.d_kv)), seed, "text_encoder",
                                folder / "text_encoder", "model", dtype)

        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                flow_shift=self.spec["flow_shift"][size]).save_config(folder / "scheduler")
        index = {
            "_class_name": self.spec["pipeline"], "_diffusers_version": diffusers.__version__,
            "boundary_ratio": self.spec["boundary_ratio"], "expand_timesteps": self.spec["expand_timesteps"],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
            "vae": ["diffusers", "AutoencoderKLWan"],
            **{sub: ["diffusers", "WanTransformer3DModel"] for sub in self.spec["denoisers"]},
        }
        if self.spec["pipeline"] == "WanImageToVideoPipeline":  # TI2V: no CLIP image encoder
            index.update(image_encoder=[None, None], image_processor=[None, None], transformer_2=[None, None])
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


A14B = WanZoo("a14b")
TI2V = WanZoo("ti2v")
