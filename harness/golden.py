"""Golden reference outputs: what diffusers produced for each smoke cell when the goldens were last accepted.

A sweep compares a fresh reference run with these, so a diffusers (or torch) upgrade shows up as reference
drift, separately from engine error. Goldens change only through `parity golden update`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.provenance import versions

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"


class GoldenMissing(FileNotFoundError):
    pass


def golden_path(root: Path, suite: str, ref_key: str, seed: int) -> Path:
    return Path(root) / suite / ref_key / f"seed{seed}.safetensors"


def save_golden(path: Path, final_latents: torch.Tensor, images: np.ndarray, model_hash: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    meta = {"model_hash": model_hash, **versions()}
    save_file({"final_latents": final_latents.float().contiguous(),
               "images": torch.from_numpy(np.ascontiguousarray(images))}, str(tmp), metadata=meta)
    tmp.replace(path)
    (path.parent / "manifest.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


# The library versions a golden records, and the report columns that carry them beside the run's own.
VERSION_KEYS = ("torch_version", "diffusers_version", "transformers_version")
GOLDEN_COLUMNS = tuple(f"golden_{k}" for k in VERSION_KEYS)


@dataclass(frozen=True)
class Golden:
    final_latents: torch.Tensor
    images: np.ndarray
    versions: dict[str, str]  # VERSION_KEYS -> what the golden was made with

    def columns(self) -> dict[str, str]:
        return {f"golden_{k}": self.versions.get(k, "unknown") for k in VERSION_KEYS}

    def version_note(self, current: dict[str, str]) -> str:
        """'' when the run uses the golden's libraries; otherwise which ones moved, so a failing drift row points
        at the upgrade rather than at the model."""
        moved = [f"{k.removesuffix('_version')} {self.versions.get(k, 'unknown')} -> {current.get(k, 'unknown')}"
                 for k in VERSION_KEYS if self.versions.get(k) != current.get(k)]
        if not moved:
            return ""
        return ("library versions differ from the golden's (" + ", ".join(moved) + "): if this row fails, the "
                "upgrade moved the reference; review it, then `parity golden update`")


def load_golden(path: Path, model_hash: str) -> Golden:
    if not path.is_file():
        raise GoldenMissing(f"no golden at {path}: run `parity golden update --suite <suite>` to create it")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("model_hash") != model_hash:
        raise GoldenMissing(
            f"golden {path} was made from model {meta.get('model_hash')}, this run uses {model_hash}: the weights or "
            "a numerics-relevant config value differ (library version stamps are not part of a model's identity); "
            "run `parity golden update` once the new model is accepted")
    images = tensors["images"].numpy()
    if images.ndim == 4:  # (B, H, W, 3): written before media gained their frame axis, one frame
        images = images[:, None]
    return Golden(tensors["final_latents"], images, {k: meta.get(k, "unknown") for k in VERSION_KEYS})
