"""How far a value is from a threshold or a baseline, in one scale that every gated metric shares.

Every gated metric maps to an *error* e >= 0 where 0 is perfect, so that "how close to failing" and "how much
worse than before" read the same for a cosine, a dB ratio and a pixel difference:
  - higher is better, no unit (cosines, SSIM, CLIP image similarity; all at most 1): e = 1 - v
  - higher is better, in dB (SQNR, PSNR):                                          e = 10^(-v/10), a power ratio
  - lower is better (relative errors, mean |pixel difference|):                   e = v
  - absolute (signed deltas whose ideal is 0):                                      e = |v|
budget_used = e(value) / e(threshold): the share of the error a threshold allows that a value uses (> 1 fails).
"""
from __future__ import annotations

import math

from harness.metrics import metric_spec


def error_of(metric: str, value: float) -> float:
    spec = metric_spec(metric)
    if spec.absolute:
        return abs(value)
    if not spec.higher_is_better:
        return value
    if spec.unit == "dB":
        return 10.0 ** (-value / 10.0)
    if spec.unit == "":
        return 1.0 - value
    raise ValueError(f"metric {metric!r} (higher is better, unit {spec.unit!r}) has no error scale; "
                     f"add one to harness/margins.py")


def margin(metric: str, value: float, op: str, threshold: float) -> float:
    """Headroom in the metric's own units: positive passes, negative fails (|value| for absolute metrics)."""
    v = abs(value) if metric_spec(metric).absolute else value
    if op == "==":  # an exactness tier: no headroom at all, any distance fails
        return -abs(v - threshold)
    return v - threshold if op == ">=" else threshold - v


def budget_used(metric: str, value: float, threshold: float) -> float:
    """e(value) / e(threshold); inf when the threshold allows no error at all and the value has some."""
    e_v, e_t = error_of(metric, value), error_of(metric, threshold)
    if e_t <= 0:
        return 0.0 if e_v <= 0 else math.inf
    return max(e_v, 0.0) / e_t
