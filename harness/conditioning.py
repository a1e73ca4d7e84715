"""What the engine feeds its denoiser as conditioning at step 0 (prompt embeddings, text features, pooled embeddings,
both guidance branches) against what the compared side feeds its own: `conditioning_cosine` (the worst conditioning
tensor's cosine) and `conditioning_rel_error` (the worst one's ||test - ref|| / ||ref||), per sample.

Why a metric of its own: a tiny zoo denoiser barely responds to its text path, so a text-encoder bug (a tapped layer
off by one, a text encoder's scales misapplied, embeddings scaled by 1%) moves the final latents by less than any
floor; only a bitwise comparison saw it. The conditioning tensors show it directly, on any device.

Generic: the family names which of its step-0 inputs are conditioning (engine.family.Family.conditioning, reached
through engine.api); this module only compares them. Both sides record step-0 inputs under the same names
(engine.api.guided_inputs: diffusers kwargs, the negative branch's under "negative.").
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from engine.api import NEGATIVE, conditioning_inputs
from harness import metrics as M

METRICS = ("conditioning_cosine", "conditioning_rel_error")


def _has_negative(inputs: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(NEGATIVE) for k in inputs)


def pairs(test: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], names: Sequence[str],
          n_samples: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, test tensor, ref tensor) for every declared conditioning input of this step: the negative branch's only
    where the reference ran one. Anything missing or mis-shaped is a MetricError (a refused row fails the gate)."""
    if not names:
        raise M.MetricError("the family declares no conditioning inputs (engine.family.Family.conditioning)")
    if _has_negative(test) != _has_negative(ref):
        sides = {True: "has", False: "has no"}
        raise M.MetricError(f"test {sides[_has_negative(test)]} negative branch, ref {sides[_has_negative(ref)]}: "
                            "the two sides guide differently")
    chosen = [n for n in names if _has_negative(ref) or not n.startswith(NEGATIVE)]
    for side, inputs in (("ref", ref), ("test", test)):
        if missing := [n for n in chosen if n not in inputs]:
            raise M.MetricError(f"{side} step-0 inputs lack conditioning {missing}; recorded: {sorted(inputs)}")
    return [(n, _per_sample(test[n], n, "test", n_samples), _per_sample(ref[n], n, "ref", n_samples)) for n in chosen]


def _per_sample(x: torch.Tensor, name: str, side: str, n_samples: int) -> torch.Tensor:
    """One row per sample. A single row serves every sample: diffusers encodes one negative prompt once for a batch
    (a (1, S, D) negative beside a batch of 2), where an engine may repeat it; both mean the same input."""
    if x.dim() >= 1 and x.shape[0] == 1:
        return x.expand(n_samples, *x.shape[1:])
    if x.dim() < 1 or x.shape[0] != n_samples:
        raise M.MetricError(f"{side} conditioning {name!r} of shape {tuple(x.shape)} is neither one row per sample "
                            f"({n_samples} samples) nor one row for all")
    return x


def compare(test: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], names: Sequence[str],
            n_samples: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    """metric -> (per-sample worst value over the conditioning tensors, the name of that tensor per sample)."""
    found = pairs(test, ref, names, n_samples)
    cos = np.stack([M.cosine(t, r, what=f"conditioning {n}") for n, t, r in found])  # (tensors, B)
    rel = np.stack([M.rel_error(t, r, what=f"conditioning {n}") for n, t, r in found])
    labels = [n for n, _, _ in found]
    return {"conditioning_cosine": (cos.min(axis=0), [labels[i] for i in cos.argmin(axis=0)]),
            "conditioning_rel_error": (rel.max(axis=0), [labels[i] for i in rel.argmax(axis=0)])}


def add_rows(rows, comparison: str, family: str, test, ref) -> None:
    """The sweep's rows for one comparison: one per sample and metric, each naming its worst conditioning tensor.
    `test` and `ref` are Artifacts; `rows` the sweep's row collector (refusals become invalid rows)."""
    computed: dict = {}

    def metric(name):
        def compute():
            if not computed:
                computed.update(compare(test.step0_inputs, ref.step0_inputs, conditioning_inputs(family), rows.n))
            return computed[name][0]
        return compute

    for name in METRICS:
        first = len(rows.rows)
        if rows.add(comparison, name, metric(name)) is not None:
            for row, worst in zip(rows.rows[first:], computed[name][1]):
                row["reason"] = f"worst: {worst}"
