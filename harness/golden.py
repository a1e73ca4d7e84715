"""Golden reference outputs: what diffusers produced for each smoke cell when the goldens were last accepted.

A sweep compares a fresh reference run with these, so a diffusers (or torch) upgrade shows up as reference
drift, separately from engine error. Goldens change only through `parity golden update`."""
from __future__ import annotations

import json
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


def load_golden(path: Path, model_hash: str) -> tuple[torch.Tensor, np.ndarray]:
    if not path.is_file():
        raise GoldenMissing(f"no golden at {path}: run `parity golden update --suite <suite>` to create it")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        stored_hash = (f.metadata() or {}).get("model_hash")
    if stored_hash != model_hash:
        raise GoldenMissing(f"golden {path} was made from model folder {stored_hash}, this run uses {model_hash}: "
                            "the zoo changed; run `parity golden update` once the change is accepted")
    return tensors["final_latents"], tensors["images"].numpy()
