"""Zoo: a deterministic Gemma 4 unified folder in transformers' layout (config.json, model.safetensors, tokenizer,
processor), built offline.

The tiny size follows transformers' own test config for gemma4_unified (vision patch 5, pooling 2, mm_embed_dim 64;
audio_embed_dim 32; a 4-layer text model, sliding/full alternating, the last 2 layers sharing KV, bidirectional
attention over image tokens), widened where our quantized linears need it: hidden 64 and intermediate 256, so that
every block linear's in_features is a multiple of the 32-element MX block, and the MLP's 256 output features reach
mxfp4's default minimum. The real tokenizer is a 262k SentencePiece model we cannot ship: the zoo's is a byte-level
BPE (256 byte symbols, no merges) plus Gemma's special tokens, whose ids the config names, so model and tokenizer
always agree.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.zoo import synth, tokenizers

SIZES = ("tiny",)
STORAGE_DTYPE = {"tiny": torch.float32}
# Gemma's specials after the 256 byte symbols (the real ids are 0..2 and 255999.. in a 262k vocabulary).
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|image|>", "<|audio|>", "<|boi|>", "<|eoi|>", "<|boa|>",
            "<|eoa|>", "<|video|>")
VOCAB_SIZE = 256 + len(SPECIALS)
TEXT = {"tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, global_head_dim=32, num_kv_shared_layers=2,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                     sliding_window=16, use_bidirectional_attention="vision", final_logit_softcapping=30.0,
                     max_position_embeddings=512, rms_norm_eps=1e-6)}
VISION = {"tiny": dict(patch_size=5, pooling_kernel_size=2, mm_embed_dim=64, output_proj_dims=64, mm_posemb_size=1120,
                       rms_norm_eps=1e-6)}
AUDIO = {"tiny": dict(audio_embed_dim=32, rms_norm_eps=1e-6)}
# The processor's per-image soft-token budget: the smallest transformers allows. Images are not resized (the zoo's
# prompts use sides divisible by patch_size * pooling), so an image of H x W gives (H/10) * (W/10) soft tokens and
# the rest of the 70 rows are padding with position (-1, -1): what the embedder's padding mask exists for.
MAX_SOFT_TOKENS = 70
# The token table doubles as the LM head (tied) and is scaled by sqrt(hidden) on input: at N(0, 1) the logits sit at
# the 30.0 soft cap and greedy decoding repeats one token. At 0.2 (with the q/k norm scaling of write_weights) the
# logits reach ~10, greedy continuations change token 1-3 times in 16, and fp8 keeps top-1 agreement at 0.96-1.0
# (measured); at 0.05 the logits stay under 2 and near-ties make top-1 flip under any quantization.
EMBED_GAIN = 0.2


def token_ids() -> dict[str, int]:
    return {tok: 256 + i for i, tok in enumerate(SPECIALS)}


def _check(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown gemma4-unified size {size!r}; valid sizes: {', '.join(SIZES)}")


def write_tokenizer(folder: Path):
    """A byte-level BPE with Gemma's specials that AutoTokenizer loads offline; checked after loading."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {ch: byte for byte, ch in tokenizers._bytes_to_unicode().items()}  # id == byte value
    vocab.update(token_ids())
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    named = {"image_token": "<|image|>", "audio_token": "<|audio|>", "boi_token": "<|boi|>", "eoi_token": "<|eoi|>",
             "boa_token": "<|boa|>", "eoa_token": "<|eoa|>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens=named, model_max_length=512)
    tok.save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    ids = token_ids()
    got = loaded("a<|boi|><|image|><|eoi|>").input_ids
    want = [ord("a"), ids["<|boi|>"], ids["<|image|>"], ids["<|eoi|>"]]
    if len(loaded) != VOCAB_SIZE or got != want or loaded.image_token_id != ids["<|image|>"]:
        raise RuntimeError(f"synthetic Gemma tokenizer is wrong: {len(loaded)} tokens, probe {got}, expected {want}")
    return loaded


def config(size: str):
    from transformers import Gemma4UnifiedConfig

    _check(size)
    ids = token_ids()
    text = dict(TEXT[size], vocab_size=VOCAB_SIZE, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
                bos_token_id=ids["<bos>"])
    cfg = Gemma4UnifiedConfig(text_config=text, vision_config=VISION[size], audio_config=AUDIO[size],
                              image_token_id=ids["<|image|>"], audio_token_id=ids["<|audio|>"],
                              video_token_id=ids["<|video|>"], boi_token_id=ids["<|boi|>"],
                              eoi_token_id=ids["<|eoi|>"], boa_token_id=ids["<|boa|>"],
                              eoa_token_index=ids["<|eoa|>"], tie_word_embeddings=True)
    cfg.architectures = ["Gemma4UnifiedForConditionalGeneration"]
    return cfg


def specs(size: str) -> list[synth.ParamSpec]:
    """Every tensor of the transformers model (tied lm_head written once, as transformers writes it)."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    cfg = config(size)
    with torch.device("meta"):
        model = Gemma4UnifiedForConditionalGeneration(cfg)
    # layer_scalar (a per-layer output scale, 1 at init) is a persistent buffer that synth will not invent: give it
    # a norm weight's rule (near 1), as a trained model's scales sit; every other tensor is a parameter.
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    out = []
    for name in model.state_dict(keep_vars=True):
        if name == "lm_head.weight":  # tied to the token embedding; transformers writes it once
            continue
        owner, _, pname = name.rpartition(".")
        if name.endswith("layer_scalar"):
            out.append(synth.ParamSpec(name, tuple(model.get_buffer(name).shape), synth.NORM))
        elif name in params:
            kind = synth._kind(modules[owner], pname, name)
            out.append(synth.ParamSpec(name, tuple(params[name].shape), kind, EMBED_GAIN if kind == synth.EMBEDDING else 1.0))
        else:
            raise NotImplementedError(f"persistent buffer {name} cannot be synthesized")
    return out


def write_weights(folder: Path, size: str, seed: int, dtype: torch.dtype) -> None:
    """model.safetensors: synth's tensors, with the query/key norm weights scaled by head_dim^-1/4 each. Gemma 4
    attends with scaling 1.0 after its q/k RMS norms, so a trained model's q_norm/k_norm weights carry the
    1/sqrt(head_dim) that other models apply: at synth's ~1 the attention logits have std sqrt(head_dim) and the
    tiny model turns chaotic (fp8 weights alone moved its logits to cosine 0.55, measured)."""
    from safetensors.torch import save_file

    head_dim = TEXT[size]["head_dim"]
    tensors = synth.synthesize(specs(size), seed, "model")
    for name, t in tensors.items():
        if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
            tensors[name] = t * head_dim ** -0.25
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def write_processor(folder: Path, size: str, tokenizer_dir: Path) -> None:
    from transformers import (
        AutoTokenizer, Gemma4UnifiedAudioFeatureExtractor, Gemma4UnifiedImageProcessor, Gemma4UnifiedProcessor,
    )
    from transformers.models.gemma4_unified.video_processing_gemma4_unified import Gemma4UnifiedVideoProcessor

    v, spt = VISION[size], AUDIO[size]["audio_embed_dim"]
    image = Gemma4UnifiedImageProcessor(patch_size=v["patch_size"], pooling_kernel_size=v["pooling_kernel_size"],
                                        max_soft_tokens=MAX_SOFT_TOKENS, do_resize=False)
    video = Gemma4UnifiedVideoProcessor(patch_size=v["patch_size"], pooling_kernel_size=v["pooling_kernel_size"],
                                        max_soft_tokens=MAX_SOFT_TOKENS)
    audio = Gemma4UnifiedAudioFeatureExtractor(feature_size=spt, audio_samples_per_token=spt)
    Gemma4UnifiedProcessor(feature_extractor=audio, image_processor=image, video_processor=video,
                           tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir)).save_pretrained(folder)


def write(folder: Path, size: str, seed: int, dtype: torch.dtype | None = None,
          sensitive_layer: str | None = None) -> None:
    _check(size)
    if sensitive_layer is not None:
        raise ValueError(f"the gemma4-unified zoo cannot plant a sensitive layer ({sensitive_layer!r}); valid: none")
    folder = Path(folder)
    dtype = dtype or STORAGE_DTYPE[size]
    cfg = config(size)
    cfg.dtype = dtype
    cfg.save_pretrained(folder)
    write_weights(folder, size, seed, dtype)
    write_tokenizer(folder)
    write_processor(folder, size, folder)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "Gemma4UnifiedForConditionalGeneration", "_note": "transformers folder; no diffusers pipeline"},
        indent=2, sort_keys=True) + "\n")
