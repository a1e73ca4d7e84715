"""Z-Image (and Z-Image-Turbo: the same folders, other sampling settings) in the zoo: size tables and the writer of
diffusers-format folders that `ZImagePipeline.from_pretrained` loads offline with no missing or unexpected keys.

Tiny sizes, and why they look the way they do:
  - transformer: diffusers' own test config (ANCHORS section 1) with three changes: 4 heads of 24 (dim 96) instead
    of 1 head of 16, so sequence-parallel cells can split heads over 2 and 4 ranks and the feed-forward's hidden
    width int(dim / 3 * 8) = 256 takes every quant format (NVFP4 needs in_features % 16, MXFP4 % 32; dim 64 gives
    170), with MXFP4's output-dim < 256 skip still reaching to_out and w2 (96 outputs); axes_dims (8, 8, 8) to sum
    to the head dim; axes_lens (1024, 64, 64) instead of (256, 32, 32), so captions of the byte-level tokenizer
    (one token per byte, up to max_sequence_length 512) and the suite's image grids stay inside the RoPE tables. x_pad_token / cap_pad_token are drawn like any other
    tensor (diffusers creates them with torch.empty; the pads take part in attention, so their values matter).
  - VAE: FLUX.1's tiny AutoencoderKL geometry with 16 latent channels (vae_scale_factor 2).
  - text encoder: a 2-layer Qwen3Model whose width is the transformer's cap_feat_dim (16); the pipeline reads
    hidden_states[-2], the first layer's output.
Tokenizer: the synthetic Qwen byte-level BPE of harness/zoo/qwen_image.py (Qwen3 uses the same special tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.zoo import synth
from harness.zoo.qwen_image import QWEN_VOCAB_SIZE, qwen_token_ids, write_qwen_tokenizer

SIZES = ("tiny", "full")
STORAGE_DTYPE = {"tiny": torch.float32, "full": torch.bfloat16}

TRANSFORMER = {
    "tiny": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=96, n_layers=2, n_refiner_layers=1,
                 n_heads=4, n_kv_heads=4, cap_feat_dim=16, axes_dims=[8, 8, 8], axes_lens=[1024, 64, 64]),
    # Tongyi-MAI/Z-Image-Turbo: 30 layers + 2 + 2 refiners, 30 heads of 128, Qwen3-4B's 2560-wide hidden states.
    "full": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
                 n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
                 t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]),
}
VAE = {
    "tiny": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                 latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
    "full": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                 latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
}
TEXT = {
    "tiny": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=4096),
    # Qwen3-4B.
    "full": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),
}
# Z-Image-Turbo's scheduler_config.json: a static shift of 3.
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
MODULATION = ("adaLN_modulation", "t_embedder")  # no outliers (see harness/zoo/flux1.py MODULATION_GAIN)










def _text_config(size: str):
    from transformers import Qwen3Config

    ids = qwen_token_ids()
    pad = ids["<|endoftext|>"]
    config = Qwen3Config(**TEXT[size], vocab_size=QWEN_VOCAB_SIZE if size == "tiny" else 151936, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, bos_token_id=pad, eos_token_id=ids["<|im_end|>"], pad_token_id=pad,
                         tie_word_embeddings=True)
    config.architectures = ["Qwen3Model"]
    return config


def transformer_config(size: str, denoiser: str = "transformer") -> dict:
    synth.check_size("z-image", size, SIZES, denoiser)
    return json.loads(json.dumps(TRANSFORMER[size]))


def transformer_specs(size: str, denoiser: str = "transformer", sensitive_layer: str | None = None
                      ) -> list[synth.ParamSpec]:
    from diffusers import ZImageTransformer2DModel

    synth.refuse_plant("z-image", sensitive_layer)
    config = transformer_config(size, denoiser)
    model = synth.on_meta(lambda: ZImageTransformer2DModel(**config))
    return synth.plain_linears(synth.specs_from_module(model), MODULATION)


def denoiser_inputs(size: str, denoiser: str, prompt_seeds: list[int], seed: int, height: int, width: int,
                    text_tokens: int, sampling) -> dict[str, torch.Tensor]:
    """Step-0 inputs of the transformer (diffusers names, float32, CPU) without the text encoder: latent noise from
    `seed` as the pipeline draws it, each prompt's caption from its own seed, N(0, 1), all of text_tokens tokens;
    t = 0 (pure noise, the first step in the model's time)."""
    config = transformer_config(size, denoiser)
    batch = len(prompt_seeds)
    x = torch.randn(batch, config["in_channels"], height // 8, width // 8,
                    generator=torch.Generator().manual_seed(seed))[:, :, None]
    caps = [torch.randn(text_tokens, config["cap_feat_dim"], generator=torch.Generator().manual_seed(s))
            for s in prompt_seeds]
    return dict(x=x, t=torch.zeros(batch), cap_feats=torch.stack(caps),
                cap_lens=torch.full([batch], text_tokens, dtype=torch.int64))


def write(folder: Path, size: str, seed: int, dtype: torch.dtype | None = None,
          sensitive_layer: str | None = None) -> None:
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Model

    synth.check_size("z-image", size, SIZES)
    synth.refuse_plant("z-image", sensitive_layer)
    dtype = dtype or STORAGE_DTYPE[size]
    folder = Path(folder)
    write_qwen_tokenizer(folder / "tokenizer")
    transformer_specs_of = lambda m: synth.plain_linears(synth.specs_from_module(m), MODULATION)  # noqa: E731
    for sub, cls, kw, specs in (("transformer", ZImageTransformer2DModel, transformer_config(size), transformer_specs_of),
                                ("vae", AutoencoderKL, VAE[size], synth.specs_from_module)):
        model = synth.on_meta(lambda: cls(**kw))
        (folder / sub).mkdir()
        model.save_config(folder / sub)
        synth.write_safetensors(specs(model), seed, sub, folder / sub, "diffusion_pytorch_model", dtype)

    config = _text_config(size)
    config.dtype = dtype
    model = synth.on_meta(lambda: Qwen3Model(config))
    config.save_pretrained(folder / "text_encoder")
    synth.write_safetensors(synth.specs_from_module(model), seed, "text_encoder", folder / "text_encoder", "model",
                            dtype)

    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_config(folder / "scheduler")
    index = {
        "_class_name": "ZImagePipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
