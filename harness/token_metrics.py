"""Token-logits metrics: how a language model's outputs compare with its reference's, as pure functions.

Same contract as harness/metrics.py: float64, one value per call (one sample: one prompt and seed), MetricError
(-> an invalid row, which fails the gate) on NaN, Inf, an empty input or mismatched shapes. Names and directions are
in harness.metrics.METRICS with the other metrics.

  rows_cosine_min     worst row's cosine of two (..., D) tensors (embedder outputs: one row per soft token)
  rel_error           ||test - ref|| / ||ref|| over the whole tensor (what cosine misses: a uniform scale)
  logits_cosine_min   worst position's cosine of two (S, V) logits
  top1_agreement      share of positions whose argmax token agrees
  next_token_kl_max   worst position's KL(ref || test) of the next-token distributions, in nats
  greedy_match_rate   share of the n greedy tokens equal position by position
"""
from __future__ import annotations

import torch

from harness.metrics import MetricError, _cosine_rows, check_finite


def _pair(test, ref, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    t, r = torch.as_tensor(test), torch.as_tensor(ref)
    if t.shape != r.shape:
        raise MetricError(f"{what}: shape mismatch, test {tuple(t.shape)} vs ref {tuple(r.shape)}")
    check_finite(t, f"test {what}")
    check_finite(r, f"ref {what}")
    return t.detach().to("cpu", torch.float64), r.detach().to("cpu", torch.float64)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t[None]


def rows_cosine_min(test, ref, *, what: str = "tensor") -> float:
    t, r = (_rows(x) for x in _pair(test, ref, what))
    # metrics' row cosine: identical rows give exactly 1 (what the gate's exactness tier demands)
    return float(_cosine_rows(t, r, what, where=lambda i: f"row {i}").min())


def rel_error(test, ref, *, what: str = "tensor") -> float:
    t, r = _pair(test, ref, what)
    norm = r.norm()
    if norm == 0:
        raise MetricError(f"{what}: reference is all zeros; relative error is undefined")
    return float((t - r).norm() / norm)


def _logits(test, ref, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    t, r = _pair(test, ref, what)
    if t.dim() == 3:  # (1, S, V): one prompt
        if t.shape[0] != 1:
            raise MetricError(f"{what}: one prompt per call, got batch {t.shape[0]}")
        t, r = t[0], r[0]
    if t.dim() != 2 or t.shape[0] == 0:
        raise MetricError(f"{what}: need (positions, vocab) logits, got shape {tuple(t.shape)}")
    return t, r


def logits_cosine_min(test, ref, *, what: str = "logits") -> float:
    return rows_cosine_min(*_logits(test, ref, what), what=what)


def top1_agreement(test, ref, *, what: str = "logits") -> float:
    t, r = _logits(test, ref, what)
    return float((t.argmax(-1) == r.argmax(-1)).double().mean())


def next_token_kl_max(test, ref, *, what: str = "logits") -> float:
    t, r = _logits(test, ref, what)
    log_p, log_q = torch.log_softmax(r, -1), torch.log_softmax(t, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    # Round-off can make an exact match a hair negative; KL is never below 0.
    return float(kl.clamp(min=0).max())


def greedy_match_rate(test, ref, *, what: str = "greedy tokens") -> float:
    t, r = torch.as_tensor(test), torch.as_tensor(ref)
    if t.dim() != 1 or r.dim() != 1 or r.numel() == 0:
        raise MetricError(f"{what}: need two 1-D token sequences, got {tuple(t.shape)} and {tuple(r.shape)}")
    if t.numel() != r.numel():
        raise MetricError(f"{what}: test has {t.numel()} tokens, reference {r.numel()}")
    return float((t == r).double().mean())
