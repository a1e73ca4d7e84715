"""Qwen-Image and Qwen-Image-Edit in the zoo: size tables and the writers of diffusers-format folders that
`QwenImagePipeline.from_pretrained` / `QwenImageEditPipeline.from_pretrained` load offline with no missing or
unexpected keys. Two zoo families share this file: `IMAGE` and `EDIT` (Edit adds the Qwen2-VL processor; its text
encoder's vision tower is used).

Tiny sizes, and why they look the way they do:
  - transformer: diffusers' own test config (ANCHORS section 1): 2 blocks, 4 heads of 16, text dim 16.
  - VAE: QwenImageEditPipeline always resizes the condition image to about 1 megapixel before the VAE. A VAE of
    diffusers' test geometry took 50-100 s to encode that on this CPU (slow_conv3d at full resolution, and mid-block
    attention over 256x256 latents). This one has 8 channels at every level, no residual blocks in the encoder
    stages and 16x spatial downsampling, so the 1024x1024 condition image is 64x64 latents (1024 condition tokens)
    and encodes in ~2 s on a loaded 2-core machine. It is the same diffusers class, only small; both backends run it.
  - text encoder: a 2-layer Qwen2.5-VL (text width 16 = the transformer's joint_attention_dim) with a 2-block vision
    tower; the processor resizes every image to 56x56 (4 merged vision tokens).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from harness.zoo import synth, tokenizers

SIZES = ("tiny", "full")
STORAGE_DTYPE = {"tiny": torch.float32, "full": torch.bfloat16}

TRANSFORMER = {
    "tiny": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=[8, 4, 4]),
    # Qwen/Qwen-Image (and -Edit): 60 blocks, 24 heads of 128, Qwen2.5-VL-7B's 3584-wide hidden states.
    "full": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=[16, 56, 56]),
}
# The release's per-channel latent statistics; tiny takes the first four (non-trivial, so a swapped mean/std shows).
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
               1.6382, 1.1253, 2.8251, 1.9160]
VAE = {
    "tiny": dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=0, attn_scales=[],
                 temperal_downsample=[False, True, True, True], latents_mean=LATENTS_MEAN[:4],
                 latents_std=LATENTS_STD[:4]),
    "full": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD),
}
TEXT = {
    "tiny": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}),
    # Qwen2.5-VL-7B-Instruct's language model.
    "full": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=128000,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
}
VISION = {
    "tiny": dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
    "full": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31]),
}
# Pixels the processor resizes the prompt image to (Qwen2VLImageProcessor min/max_pixels): tiny pins it to 56x56.
PROCESSOR_PIXELS = {"tiny": (56 * 56, 56 * 56), "full": (56 * 56, 28 * 28 * 1280)}
# Qwen/Qwen-Image's scheduler_config.json.
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                 use_dynamic_shifting=True)
MODULATION = ("img_mod.", "txt_mod.")  # adaLN linears: no outliers (see harness/zoo/flux1.py MODULATION_GAIN)


# --- the offline tokenizer (Qwen2.5-VL's, synthetic) -------------------------------------------------------------------
# A byte-level BPE with the 256 byte symbols and no merges (every byte is one token, so any text tokenizes and ids stay
# below 256), then Qwen's special tokens. The ids differ from the real vocabulary's (151643...): the zoo's text encoder
# configs name these ids, so a model and its tokenizer always agree.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN_VOCAB_SIZE = 256 + len(QWEN_SPECIALS)
QWEN_MAX_LENGTH = 32768
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_token_ids() -> dict[str, int]:
    """Special token -> id in the synthetic Qwen vocabulary (after the 256 bytes, in QWEN_SPECIALS order)."""
    return {tok: 256 + i for i, tok in enumerate(QWEN_SPECIALS)}


def write_qwen_tokenizer(folder: Path):
    """Write a Qwen2Tokenizer that `AutoTokenizer.from_pretrained(folder)` loads; return the loaded tokenizer."""
    from transformers import AddedToken, AutoTokenizer, Qwen2Tokenizer

    folder = Path(folder)
    vocab = {ch: byte for byte, ch in tokenizers._bytes_to_unicode().items()}  # id == byte value
    vocab.update(qwen_token_ids())
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=QWEN_MAX_LENGTH, errors="replace")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    probe = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>a cat<|im_end|>"
    ids = loaded(probe).input_ids
    want = [257, *b"user\n", 259, 262, 260, *b"a cat", 258]
    if len(loaded) != QWEN_VOCAB_SIZE or ids != want or loaded.pad_token_id != 256:
        raise RuntimeError(f"synthetic Qwen tokenizer is wrong: {len(loaded)} tokens, probe ids {ids}, expected {want}")
    return loaded










def _vae_specs(model) -> list[synth.ParamSpec]:
    # The VAE's RMS norms hold their scale in `gamma`, which synth cannot recognise by name: make it a norm weight.
    specs = synth.specs_from_module(model)
    return [dataclasses.replace(s, kind=synth.NORM) if s.name.endswith(".gamma") else s for s in specs]


def _text_config(size: str, edit: bool):
    from transformers import Qwen2_5_VLConfig

    ids = qwen_token_ids()
    pad = ids["<|endoftext|>"]
    text = dict(TEXT[size], vocab_size=QWEN_VOCAB_SIZE if size == "tiny" else 152064,
                rms_norm_eps=1e-6, bos_token_id=pad, eos_token_id=ids["<|im_end|>"], pad_token_id=pad)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=VISION[size], image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def _write_processor(folder: Path, size: str, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    min_pixels, max_pixels = PROCESSOR_PIXELS[size]
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                            merge_size=2, temporal_patch_size=2)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The processor insists on a video processor; the pipelines never give it videos.
    video_processor = Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                     chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(folder)


class QwenZoo:
    """One zoo family (the interface harness/zoo/__init__.py documents); `edit` adds the processor."""

    SIZES = SIZES
    STORAGE_DTYPE = STORAGE_DTYPE

    def __init__(self, pipeline_class: str, edit: bool):
        self.pipeline_class, self.edit = pipeline_class, edit

    def transformer_config(self, size: str, denoiser: str = "transformer") -> dict:
        synth.check_size("qwen-image", size, SIZES, denoiser)
        return json.loads(json.dumps(TRANSFORMER[size]))

    def transformer_specs(self, size: str, denoiser: str = "transformer", sensitive_layer: str | None = None
                          ) -> list[synth.ParamSpec]:
        from diffusers import QwenImageTransformer2DModel

        synth.refuse_plant("qwen-image", sensitive_layer)
        config = self.transformer_config(size, denoiser)
        model = synth.on_meta(lambda: QwenImageTransformer2DModel(**config))
        return synth.plain_linears(synth.specs_from_module(model), MODULATION)

    def denoiser_inputs(self, size: str, denoiser: str, prompt_seeds: list[int], seed: int, height: int, width: int,
                        text_tokens: int, sampling) -> dict[str, torch.Tensor]:
        """Step-0 inputs of the transformer (diffusers names, float32, CPU) without the text encoder: latent noise
        from `seed` as the pipeline draws it, each prompt's hidden states from its own seed, N(0, 1); no padding
        (no mask), no condition image; timestep 1 (the first step of the schedule)."""
        config = self.transformer_config(size, denoiser)
        h2, w2 = height // 16, width // 16  # VAE /8, then 2x2 packing
        batch = len(prompt_seeds)
        noise = torch.randn(batch, h2 * w2, config["in_channels"], generator=torch.Generator().manual_seed(seed))
        texts = [torch.randn(text_tokens, config["joint_attention_dim"], generator=torch.Generator().manual_seed(s))
                 for s in prompt_seeds]
        return dict(hidden_states=noise, encoder_hidden_states=torch.stack(texts), timestep=torch.ones(batch),
                    img_shapes=torch.tensor([[(1, h2, w2)]] * batch, dtype=torch.int64))

    def write(self, folder: Path, size: str, seed: int, dtype: torch.dtype | None = None,
              sensitive_layer: str | None = None) -> None:
        import diffusers
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        synth.check_size("qwen-image", size, SIZES)
        synth.refuse_plant("qwen-image", sensitive_layer)
        dtype = dtype or STORAGE_DTYPE[size]
        folder = Path(folder)
        write_qwen_tokenizer(folder / "tokenizer")
        if self.edit:
            _write_processor(folder / "processor", size, folder / "tokenizer")

        transformer_specs_of = lambda m: synth.plain_linears(synth.specs_from_module(m), MODULATION)  # noqa: E731
        for sub, cls, kw, specs in (("transformer", QwenImageTransformer2DModel, self.transformer_config(size),
                                     transformer_specs_of), ("vae", AutoencoderKLQwenImage, VAE[size], _vae_specs)):
            model = synth.on_meta(lambda: cls(**kw))
            (folder / sub).mkdir()
            model.save_config(folder / sub)
            synth.write_safetensors(specs(model), seed, sub, folder / sub, "diffusion_pytorch_model", dtype)

        config = _text_config(size, self.edit)
        config.dtype = dtype
        model = synth.on_meta(lambda: Qwen2_5_VLForConditionalGeneration(config))
        config.save_pretrained(folder / "text_encoder")
        synth.write_safetensors(synth.specs_from_module(model), seed, "text_encoder", folder / "text_encoder",
                                "model", dtype)

        FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_config(folder / "scheduler")
        index = {
            "_class_name": self.pipeline_class, "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
        }
        if self.edit:
            index["processor"] = ["transformers", "Qwen2VLProcessor"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


IMAGE = QwenZoo("QwenImagePipeline", edit=False)
EDIT = QwenZoo("QwenImageEditPipeline", edit=True)
