"""CLIP scores with open_clip: text-image CLIPScore and image-image embedding similarity.

Two kinds of scorer, and every report must say which one produced its numbers (see `provenance`):
- `ClipScorer.default()`: a tiny randomly initialised CLIP (harness/clip_tiny.json) under a fixed seed. It needs
  no download and is deterministic, so it still catches images that changed, but its numbers are NOT semantic:
  a high similarity means "similar pixels to a random ViT", not "same content", and its CLIPScore is noise.
- `ClipScorer.from_pretrained(name, path)`: real weights from a local checkpoint file; semantic.
"""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.metrics import MetricError, check_finite, check_images, cosine

TINY_NAME = "parity-tiny-clip"
TINY_CONFIG = Path(__file__).with_name("clip_tiny.json")
TINY_SEED = 0
MEMO_SIZE = 256  # embeddings kept per scorer: a sweep's distinct image batches and prompt lists, bounded for long runs


@functools.lru_cache(maxsize=None)
def _register_tiny_config() -> str:
    """Register clip_tiny.json with open_clip once per process; returns the open_clip model name (the file stem)."""
    import open_clip  # deferred: importing open_clip pulls in torchvision, too slow for every harness import

    open_clip.add_model_config(TINY_CONFIG)
    return TINY_CONFIG.stem


def _build_tiny(device: str = "cpu"):
    """Build the tiny random CLIP afresh: (model, eval transform, tokenizer). Same weights on every call."""
    import open_clip

    name = _register_tiny_config()
    # Module init draws from the global RNG; fork_rng restores it afterwards, so building the scorer never
    # changes the random stream that the pipelines under test draw from.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def _build_pretrained(model_name: str, pretrained_path: str, device: str = "cpu"):
    import open_clip

    path = Path(pretrained_path)
    if not path.is_file():
        # open_clip reads a string that is not a file as a hub tag name; say the real cause here instead.
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist (no hub access: give a local file)")
    # require_pretrained: a checkpoint that fails to load must not silently leave a random (non-semantic) model.
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(path), device=device, require_pretrained=True)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


# One model per (kind, device) per process: building even the tiny one costs an open_clip import and init.
_tiny_parts = functools.lru_cache(maxsize=None)(_build_tiny)
_pretrained_parts = functools.lru_cache(maxsize=None)(_build_pretrained)


class ClipScorer:
    """Embeds uint8 images and prompts with one open_clip model and scores them per sample."""

    def __init__(self, model, preprocess, tokenizer, *, name: str, semantic: bool, device: str = "cpu"):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.name, self.semantic, self.device = name, semantic, device
        # Embeddings by their exact input: a sweep scores the same prompts in every cell and the same reference
        # images in every cell sharing a reference, each test batch twice (CLIPScore and image similarity). The same
        # batch through the same model in one process gives the same embedding, so a hit changes no value.
        self._memo: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def _memoized(self, key: tuple, embed) -> torch.Tensor:
        key += (torch.get_num_threads(),)  # CPU results depend on it (harness.refcache.device_kind)
        if key in self._memo:
            self._memo.move_to_end(key)
        else:
            self._memo[key] = embed()  # embed checks finiteness first: a refused input is never stored
            if len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        return self._memo[key].clone()

    @classmethod
    def default(cls, device: str = "cpu") -> "ClipScorer":
        """The tiny random CLIP: offline and deterministic, but not semantic."""
        return cls(*_tiny_parts(device), name=TINY_NAME, semantic=False, device=device)

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained_path: str, device: str = "cpu") -> "ClipScorer":
        """A real open_clip architecture (e.g. "ViT-B-32") with weights from a local file."""
        parts = _pretrained_parts(model_name, str(pretrained_path), device)
        return cls(*parts, name=f"{model_name}:{Path(pretrained_path).name}", semantic=True, device=device)

    def provenance(self) -> dict:
        """The schema's provenance columns that say which CLIP produced a row."""
        return {"clip_model": self.name, "clip_semantic": self.semantic}

    # ------------------------------------------------------------ embeddings

    @torch.no_grad()
    def embed_images(self, images, what: str = "images") -> torch.Tensor:
        """(B, F, H, W, 3) uint8 (or (B, H, W, 3)) -> (B, F, D) float64 frame embeddings (not normalised)."""
        imgs = check_images(images, what)

        def embed():
            frames = imgs.reshape(-1, *imgs.shape[2:])
            batch = torch.stack([self.preprocess(Image.fromarray(im)) for im in frames]).to(self.device)
            emb = self.model.encode_image(batch).double().cpu()
            check_finite(emb, f"CLIP embedding of {what}")
            return emb.reshape(imgs.shape[0], imgs.shape[1], -1)

        data = np.ascontiguousarray(imgs)
        return self._memoized(("images", data.shape, str(data.dtype), hashlib.sha256(data.tobytes()).digest()), embed)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """list of B prompts -> (B, D) float64 text embeddings (not normalised)."""
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise MetricError(f"prompts must be a list of str, got {type(prompts).__name__}")

        def embed():
            # open_clip's tokenizer truncates to the context length (77), as CLIPScore does.
            tokens = self.tokenizer(list(prompts)).to(self.device)
            emb = self.model.encode_text(tokens).double().cpu()
            check_finite(emb, "CLIP text embedding")
            return emb

        return self._memoized(("texts", tuple(prompts)), embed)

    # ------------------------------------------------------------ scores

    def text_image_score(self, images, prompts: list[str]) -> np.ndarray:
        """CLIPScore per sample: 100 * max(cos(frame_emb, text_emb), 0), the mean over frames; (B,) float64."""
        imgs = check_images(images, "images")
        if len(prompts) != imgs.shape[0]:
            raise MetricError(f"{imgs.shape[0]} images but {len(prompts)} prompts")
        frames = self.embed_images(imgs)
        texts = self.embed_texts(prompts)[:, None].expand(-1, frames.shape[1], -1)
        cos = cosine(frames.reshape(-1, frames.shape[-1]), texts.reshape(-1, texts.shape[-1]), what="CLIP embeddings")
        return (100.0 * np.maximum(cos, 0.0)).reshape(imgs.shape[0], -1).mean(axis=1)

    def image_image_similarity(self, a, b) -> np.ndarray:
        """Cosine of the frame embeddings of a[i] and b[i], the mean over frames; (B,) float64."""
        ia, ib = check_images(a, "test images"), check_images(b, "ref images")
        if ia.shape[:2] != ib.shape[:2]:
            raise MetricError(f"batch/frame mismatch: test images {ia.shape} vs ref images {ib.shape}")
        # Sizes may differ (the transform resizes), only the batch and frame count must match.
        ea, eb = self.embed_images(ia, "test images"), self.embed_images(ib, "ref images")
        cos = cosine(ea.reshape(-1, ea.shape[-1]), eb.reshape(-1, eb.shape[-1]), what="CLIP image embeddings")
        return cos.reshape(ia.shape[0], -1).mean(axis=1)

