"""Module names: which checkpoint modules make up each engine linear, and --quant-ignored-layers patterns.

Patterns are matched on dot boundaries against engine names and, through the packed-modules mapping, against
the checkpoint (diffusers) names of the modules each engine linear is built from, so a user can name either.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from safetensors import safe_open
from torch import nn

from engine.loading import KeyMap, safetensors_files


@dataclass(frozen=True)
class Packed:
    """One engine linear made of checkpoint linears stacked along its output rows (one source: a renamed module).
    rows None: sizes unknown, and NVFP4 then uses one global scale for the whole fused module."""

    sources: tuple[str, ...]
    rows: tuple[int, ...] | None


def packed_from_key_map(key_map: KeyMap, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Packed]:
    """engine module -> its checkpoint modules (and their row counts if `shapes` of the checkpoint tensors are
    given), from the `<module>.weight` entries of the key map."""
    out = {}
    for name, srcs in key_map.items():
        if name.endswith(".weight") and all(s.endswith(".weight") for s in srcs):
            rows = None if shapes is None else tuple(int(shapes[s][0]) for s in srcs)
            out[name.removesuffix(".weight")] = Packed(tuple(s.removesuffix(".weight") for s in srcs), rows)
    return out


def checkpoint_shapes(component_dir: Path) -> dict[str, list[int]]:
    """Tensor shapes of a folder's weights, read from the safetensors headers (no data loaded)."""
    shapes = {}
    for file in safetensors_files(component_dir):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether the dot-separated segments of `pattern` occur as a contiguous run of `name`'s segments (each
    segment an fnmatch glob). "single_blocks.3" matches "single_blocks.3.linear1", not "single_blocks.30.linear1";
    "proj_out" matches "proj_out" and "single_transformer_blocks.0.proj_out"."""
    pat, parts = pattern.split("."), name.split(".")
    return any(all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts[i:i + len(pat)], pat))
               for i in range(len(parts) - len(pat) + 1))


def resolve_ignored(patterns: Iterable[str], linear_names: Iterable[str],
                    packed: Mapping[str, Packed] | None = None) -> set[str]:
    """Engine linear names the patterns reach, directly or through a checkpoint name of a packed module (which
    then keeps the whole fused module unquantized). A pattern that reaches nothing is a ValueError."""
    packed = packed or {}
    aliases = {n: (n, *packed[n].sources) if n in packed else (n,) for n in linear_names}
    hit: set[str] = set()
    for pattern in patterns:
        found = {n for n, names in aliases.items() if any(pattern_matches(pattern, a) for a in names)}
        if not found:
            every = sorted({a for names in aliases.values() for a in names})
            close = difflib.get_close_matches(pattern, every, n=5, cutoff=0.5) or every[:8]
            raise ValueError(f"--quant-ignored-layers pattern {pattern!r} matches no linear module; "
                             f"valid names include {close}")
        hit |= found
    return hit


def in_block(name: str, module: nn.Module) -> bool:
    """The default filter: a linear inside a numbered block, i.e. a ModuleList entry (why: engine/quant/api.py)."""
    return any(part.isdigit() for part in name.split("."))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


