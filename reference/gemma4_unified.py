"""The reference for Gemma 4 unified: transformers' own Gemma4UnifiedForConditionalGeneration and its processor,
run on the same folder and the same raw media as the engine.

`encode(text, images, waveforms)` runs the folder's processor (tokenizer with placeholder expansion, image patches
and positions, audio frames) and returns both what the reference model takes and what the engine takes: the engine
gets the token ids, token types and image patches the processor made, but the raw waveforms (its own embedder frames
them). `run(batch, n_tokens)` gives the reference's embedder outputs, logits and greedy continuation (transformers'
`generate`, with its KV cache: a path of its own, apart from the engine's full recompute).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

BACKEND = "transformers"


class Gemma4UnifiedReference:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoProcessor, Gemma4UnifiedForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = Gemma4UnifiedForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device

    def encode(self, text: str, images: list[torch.Tensor], waveforms: list[np.ndarray]) -> dict:
        kwargs = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = [images]
        if waveforms:
            kwargs["audio"] = waveforms
        batch = dict(self.processor(**kwargs))
        engine = {"input_ids": batch["input_ids"], "mm_token_type_ids": batch["mm_token_type_ids"]}
        if images:
            engine.update(pixel_values=batch["pixel_values"], image_position_ids=batch["image_position_ids"])
        if waveforms:
            engine["waveforms"] = tuple(torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in waveforms)
        return {"reference": batch, "engine": engine}

    @torch.no_grad()
    def run(self, batch: dict, n_tokens: int) -> dict[str, torch.Tensor]:
        """Embedder outputs (every row the embedder makes, padding rows included), logits of every position,
        and `n_tokens` greedy tokens (eos does not stop it: the comparison wants all n)."""
        inner = self.model.model
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out: dict[str, torch.Tensor] = {}
        if "pixel_values" in batch:
            out["image_embedder"] = inner.embed_vision(batch["pixel_values"], batch["image_position_ids"]).pooler_output
        if "input_features" in batch:
            frames = batch["input_features"][batch["input_features_mask"]]  # (n_frames, samples_per_token)
            out["audio_embedder"] = inner.embed_audio(inputs_embeds=frames)
        out["logits"] = self.model(**batch).logits.float()
        prompt_len = batch["input_ids"].shape[1]
        generated = self.model.generate(**batch, max_new_tokens=n_tokens, min_new_tokens=0, do_sample=False,
                                        eos_token_id=None, stop_strings=None)
        out["greedy"] = generated[0, prompt_len:]
        return {k: v.cpu() for k, v in out.items()}
