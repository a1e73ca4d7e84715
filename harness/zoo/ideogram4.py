"""Ideogram 4 in the zoo: size tables and the writer of diffusers-format folders that `Ideogram4Pipeline.from_pretrained`
loads offline with no missing or unexpected keys. Two denoisers of one architecture, `transformer` (conditional) and
`unconditional_transformer`, drawn from different seeds (the tensor namespace is the component folder).

Tiny sizes, and why they look the way they do:
  - transformers: diffusers' own test config (ANCHORS section 1: 4 heads of 8, 2 layers, intermediate 32, adaLN 16,
    mrope_section (2, 1, 1), rope_theta 1e4), except llm_features_dim = 3 tapped layers x the tiny text width 32 = 96
    (the test config's 24 is not the concatenation of any tapped layers).
  - text encoder: a Qwen3-VL (Qwen3VLModel: language model + a 1-block vision tower nothing runs) with 5 decoder
    layers of width 32; the tap rule of the full model (every third layer from 0, plus the last: 0, 3, ..., 33, 35 of
    36) gives layers (0, 3, 4) here.
  - VAE: AutoencoderKLFlux2 with two blocks (vae_scale_factor 2) and 4 latent channels, so the pipeline's 2x2 patches
    give the transformers' 16 input channels; its batch-norm statistics (the latent de-normalization) are drawn:
    mean N(0, 0.1^2), variance 1 + U(0, 1).
Tokenizer: the synthetic Qwen byte-level BPE of harness/zoo/qwen_image.py with a chat template that reads Qwen3-VL's
content lists ([{"type": "text", "text": ...}]), as the pipeline sends them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from harness.zoo import synth
from harness.zoo.qwen_image import QWEN_VOCAB_SIZE, qwen_token_ids, write_qwen_tokenizer

SIZES = ("tiny", "full")
DENOISERS = ("transformer", "unconditional_transformer")
STORAGE_DTYPE = {"tiny": torch.float32, "full": torch.bfloat16}
TEXT_LAYERS = {"tiny": 5, "full": 36}
TEXT_WIDTH = {"tiny": 32, "full": 4096}


def tapped_layers(num_layers: int) -> tuple[int, ...]:
    """The zoo's copy of the tap rule (every third layer from 0, plus the last), to size llm_features_dim."""
    return tuple(range(0, num_layers - 1, 3)) + (num_layers - 1,)


TRANSFORMER = {
    "tiny": dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32,
                 adaln_dim=16, llm_features_dim=len(tapped_layers(TEXT_LAYERS["tiny"])) * TEXT_WIDTH["tiny"],
                 rope_theta=10000, mrope_section=[2, 1, 1], norm_eps=1e-5),
    # ideogram-ai/ideogram-v4 (diffusers' defaults): 34 layers, 18 heads of 256, 13 x 4096 text features.
    "full": dict(in_channels=128, num_layers=34, attention_head_dim=256, num_attention_heads=18,
                 intermediate_size=12288, adaln_dim=512, llm_features_dim=53248, rope_theta=5000000,
                 mrope_section=[24, 20, 20], norm_eps=1e-5),
}
VAE = {
    "tiny": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                 latent_channels=4, norm_num_groups=8, sample_size=32),
    "full": dict(),  # AutoencoderKLFlux2's defaults: FLUX.2's VAE, 32 latent channels
}
TEXT = {
    "tiny": dict(hidden_size=TEXT_WIDTH["tiny"], intermediate_size=64, num_hidden_layers=TEXT_LAYERS["tiny"],
                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                                  "mrope_interleaved": True}),
    # Qwen3-VL-8B-Instruct's language model.
    "full": dict(hidden_size=TEXT_WIDTH["full"], intermediate_size=12288, num_hidden_layers=TEXT_LAYERS["full"],
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True}),
}
VISION = {
    "tiny": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4, temporal_patch_size=2,
                 spatial_merge_size=2, out_hidden_size=TEXT_WIDTH["tiny"], num_position_embeddings=16,
                 deepstack_visual_indexes=[]),
    "full": dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                 out_hidden_size=TEXT_WIDTH["full"], num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
}
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
MODULATION = ("adaln_modulation", "t_embedding", "adaln_proj")  # no outliers (see harness/zoo/flux1.py)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)










def transformer_config(size: str, denoiser: str = "transformer") -> dict:
    synth.check_size("ideogram4", size, SIZES, denoiser, denoisers=DENOISERS)
    return json.loads(json.dumps(TRANSFORMER[size]))


def transformer_specs(size: str, denoiser: str = "transformer", sensitive_layer: str | None = None
                      ) -> list[synth.ParamSpec]:
    from diffusers import Ideogram4Transformer2DModel

    synth.refuse_plant("ideogram4", sensitive_layer)
    config = transformer_config(size, denoiser)
    model = synth.on_meta(lambda: Ideogram4Transformer2DModel(**config))
    return synth.plain_linears(synth.specs_from_module(model), MODULATION)


def text_config(size: str):
    from transformers import Qwen3VLConfig

    ids = qwen_token_ids()
    pad = ids["<|endoftext|>"]
    config = Qwen3VLConfig(
        text_config=dict(TEXT[size], vocab_size=QWEN_VOCAB_SIZE if size == "tiny" else 151936, rms_norm_eps=1e-6,
                         bos_token_id=pad, eos_token_id=ids["<|im_end|>"], pad_token_id=pad),
        vision_config=VISION[size], image_token_id=ids.get("<|image_pad|>", 151655),
        video_token_id=ids.get("<|video_pad|>", 151656), vision_start_token_id=ids.get("<|vision_start|>", 151652),
        vision_end_token_id=ids.get("<|vision_end|>", 151653), tie_word_embeddings=False)
    config.architectures = ["Qwen3VLModel"]
    return config


def denoiser_inputs(size: str, denoiser: str, prompt_seeds: list[int], seed: int, height: int, width: int,
                    text_tokens: int, sampling) -> dict[str, torch.Tensor]:
    """Step-0 inputs of one transformer (diffusers names, float32, CPU) without the text encoder: latent noise from
    `seed`, each prompt's text features from its own seed, N(0, 1), text_tokens tokens each (no padding); the
    unconditional transformer gets the image tokens only; t = 0 (pure noise)."""
    config = transformer_config(size, denoiser)
    batch, patch = len(prompt_seeds), 16  # the full VAE's 8x downsampling times the 2x2 patches
    gh, gw = height // patch, width // patch
    n = gh * gw
    image = torch.randn(batch, n, config["in_channels"], generator=torch.Generator().manual_seed(seed))
    h_idx = torch.arange(gh).repeat_interleave(gw)
    w_idx = torch.arange(gw).repeat(gh)
    image_pos = torch.stack([torch.zeros_like(h_idx), h_idx, w_idx], 1) + 65536
    text = 0 if denoiser == "unconditional_transformer" else text_tokens
    pos = torch.cat([torch.arange(text)[:, None].expand(text, 3), image_pos])[None].expand(batch, -1, -1)
    feats = [torch.randn(text, config["llm_features_dim"], generator=torch.Generator().manual_seed(s))
             for s in prompt_seeds]
    return dict(
        hidden_states=torch.cat([torch.zeros(batch, text, config["in_channels"]), image], 1),
        timestep=torch.zeros(batch),
        encoder_hidden_states=torch.cat([torch.stack(feats), torch.zeros(batch, n, config["llm_features_dim"])], 1),
        position_ids=pos.contiguous(), segment_ids=torch.ones(batch, text + n, dtype=torch.long),
        indicator=torch.cat([torch.full((batch, text), 3), torch.full((batch, n), 2)], 1).long())


def _write_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    write_qwen_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)


def _write_vae(folder: Path, size: str, seed: int, dtype) -> None:
    """AutoencoderKLFlux2: its parameters synthesized like any other, its batch-norm statistics drawn (they are
    persistent buffers, which synth refuses to invent)."""
    from diffusers import AutoencoderKLFlux2
    from safetensors.torch import save_file

    model = synth.on_meta(lambda: AutoencoderKLFlux2(**VAE[size]))
    folder.mkdir()
    model.save_config(folder)
    specs = [dataclasses.replace(s, name=f"{prefix}.{s.name}") for prefix, sub in model.named_children()
             if sub is not model.bn for s in synth.specs_from_module(sub)]
    tensors = synth.synthesize(specs, seed, "vae", dtype=torch.float32)
    g = torch.Generator().manual_seed(synth.name_seed(seed, "vae.bn"))
    channels = model.bn.num_features
    tensors["bn.running_mean"] = 0.1 * torch.randn(channels, generator=g)
    tensors["bn.running_var"] = 1.0 + torch.rand(channels, generator=g)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors["bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def write(folder: Path, size: str, seed: int, dtype: torch.dtype | None = None,
          sensitive_layer: str | None = None) -> None:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Transformer2DModel
    from transformers import Qwen3VLModel

    synth.check_size("ideogram4", size, SIZES)
    synth.refuse_plant("ideogram4", sensitive_layer)
    dtype = dtype or STORAGE_DTYPE[size]
    folder = Path(folder)
    _write_tokenizer(folder / "tokenizer")
    for sub in DENOISERS:
        model = synth.on_meta(lambda: Ideogram4Transformer2DModel(**transformer_config(size, sub)))
        (folder / sub).mkdir()
        model.save_config(folder / sub)
        specs = synth.plain_linears(synth.specs_from_module(model), MODULATION)
        synth.write_safetensors(specs, seed, sub, folder / sub, "diffusion_pytorch_model", dtype)
    _write_vae(folder / "vae", size, seed, dtype)

    config = text_config(size)
    config.dtype = dtype
    model = synth.on_meta(lambda: Qwen3VLModel(config))
    config.save_pretrained(folder / "text_encoder")
    synth.write_safetensors(synth.specs_from_module(model), seed, "text_encoder", folder / "text_encoder", "model",
                            dtype)

    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_config(folder / "scheduler")
    index = {
        "_class_name": "Ideogram4Pipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLModel"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "Ideogram4Transformer2DModel"],
        "unconditional_transformer": ["diffusers", "Ideogram4Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"], "prompt_enhancer_head": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
