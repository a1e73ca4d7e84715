"""Meta-device build and assign-load of a DiT from a diffusers-format folder.

Checkpoints keep diffusers' key names (so a real downloaded folder loads unchanged); each family supplies a
key map from its own parameter names to the checkpoint names it is made of. A fused parameter lists several
checkpoint tensors, concatenated along dim 0 (output rows) in the listed order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from torch import nn

KeyMap = dict[str, tuple[str, ...]]


class CheckpointError(ValueError):
    """A model folder that does not match what the engine expects; the message names the problem."""


def read_config(component_dir: Path) -> dict:
    path = Path(component_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {component_dir}")
    return json.loads(path.read_text())


def safetensors_files(component_dir: Path) -> list[Path]:
    """The weight files of one component: a sharded index if present, else every *.safetensors file."""
    component_dir = Path(component_dir)
    index = sorted(component_dir.glob("*.safetensors.index.json"))
    if index:
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [component_dir / s for s in shards]
    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weights in {component_dir}")
    return files


def read_checkpoint(component_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(component_dir):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def remap(checkpoint: Mapping[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """Build the engine state dict from checkpoint tensors; every checkpoint key must be used exactly once."""
    missing = sorted({src for srcs in key_map.values() for src in srcs if src not in checkpoint})
    used = {src for srcs in key_map.values() for src in srcs}
    unused = sorted(set(checkpoint) - used)
    if missing or unused:
        raise CheckpointError(
            f"checkpoint does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unused)} unexpected keys {unused[:5]}"
        )
    return {
        name: checkpoint[srcs[0]] if len(srcs) == 1 else torch.cat([checkpoint[s] for s in srcs], dim=0)
        for name, srcs in key_map.items()
    }


def load_model(
    build: Callable[[], nn.Module],
    key_map: KeyMap,
    checkpoint: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: str | torch.device,
) -> nn.Module:
    """Build on the meta device (no memory, no init), then assign the checkpoint tensors in place."""
    with torch.device("meta"):
        model = build()
    expected = set(model.state_dict())
    if expected != set(key_map):
        raise CheckpointError(
            f"key map and model disagree: {sorted(expected - set(key_map))[:5]} unmapped, "
            f"{sorted(set(key_map) - expected)[:5]} not in the model"
        )
    state = {k: v.to(device=device, dtype=dtype) for k, v in remap(checkpoint, key_map).items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
