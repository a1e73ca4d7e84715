"""Accuracy metrics as pure functions, plus the registry that names them.

Every function compares a `test` output against a `ref` output and returns one float64 value per sample (dim 0),
so a single bad sample in a batch stays visible; aggregation happens later, over the long-format table.
A metric that cannot give a trustworthy number (NaN, Inf, empty input, mismatched shapes, an undefined ratio)
raises MetricError with the reason: the caller records it as an invalid row, which fails the gate.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

# Identical tensors have infinite SQNR. We report a finite cap so that rows stay finite (only finite values may
# pass the gate) and identical outputs still clear any real threshold. fp32 round-off alone is ~140 dB and public
# thresholds sit at 18-30 dB, so capping at 200 dB never hides a difference a threshold would care about.
SQNR_CAP_DB = 200.0
# skimage returns inf for identical images. Public gates sit at 18-30 dB; a single 1-LSB change in a 1024x1024
# RGB image is 113 dB, so 100 dB marks "identical or a handful of LSBs apart", far above any gate.
PSNR_CAP_DB = 100.0
# skimage's default SSIM window; smaller images get the largest odd window that fits (see ssim).
SSIM_WIN_SIZE = 7


class MetricError(ValueError):
    """A metric could not give a trustworthy number; the message says why."""


# ---------------------------------------------------------------- input checks

def check_finite(x, what: str) -> None:
    """Raise MetricError if `x` is empty or holds any NaN/Inf, e.g.
    "engine final_latents contains 12 NaN and 0 Inf values (of 4096)"."""
    t = torch.as_tensor(x)
    if t.numel() == 0:
        raise MetricError(f"{what} is empty (shape {tuple(t.shape)})")
    if not (t.is_floating_point() or t.is_complex()):
        return  # integer data cannot hold NaN or Inf
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    if n_nan or n_inf:
        raise MetricError(f"{what} contains {n_nan} NaN and {n_inf} Inf values (of {t.numel()})")


def _pair(test, ref, what: str, min_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a test/ref pair and return both as float64 CPU tensors of the same shape."""
    t, r = torch.as_tensor(test), torch.as_tensor(ref)
    if t.shape != r.shape:
        raise MetricError(f"{what}: shape mismatch, test {tuple(t.shape)} vs ref {tuple(r.shape)}")
    if t.dim() < min_dims:
        raise MetricError(f"{what}: need at least {min_dims} dims (batch first), got shape {tuple(t.shape)}")
    check_finite(t, f"test {what}")
    check_finite(r, f"ref {what}")
    # float64 so that the metric itself adds no error worth measuring, even for bf16 inputs.
    return t.detach().to("cpu", torch.float64), r.detach().to("cpu", torch.float64)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _zero_rows(norms: torch.Tensor) -> list[int]:
    return torch.nonzero(norms == 0).flatten().tolist()


def _samples(rows: list[int]) -> str:
    return ", ".join(f"sample {i}" for i in rows)


# ---------------------------------------------------------------- tensor metrics

def _cosine_rows(t: torch.Tensor, r: torch.Tensor, what: str, where=lambda i: f"sample {i}") -> torch.Tensor:
    """Row-wise cosine of (N, D) tensors; `where` turns a row index into words for error messages."""
    nt, nr = t.norm(dim=1), r.norm(dim=1)
    for side, norms in (("test", nt), ("ref", nr)):
        bad = _zero_rows(norms)
        if bad:
            # A zero vector has no direction: reporting 0 or 1 would be a made-up number.
            at = ", ".join(where(i) for i in bad)
            raise MetricError(f"{what}: {side} has zero norm at {at}; cosine is undefined")
    # Clamp only removes round-off beyond +-1 (identical inputs can give 1 + 2e-16). Identical rows are exactly 1:
    # sqrt(x)^2 need not round back to x, and the exactness tier of the gate judges cosine == 1 exactly.
    cos = ((t * r).sum(dim=1) / (nt * nr)).clamp(-1.0, 1.0)
    return torch.where((t == r).all(dim=1), torch.ones_like(cos), cos)


def cosine(test, ref, *, what: str = "tensor") -> np.ndarray:
    """Per-sample cosine similarity of the flattened samples; (B,) float64."""
    t, r = _pair(test, ref, what)
    return _cosine_rows(_flat(t), _flat(r), what).numpy()


def rel_error(test, ref, *, what: str = "tensor") -> np.ndarray:
    """Per-sample ||test - ref|| / ||ref||; (B,) float64. Unlike cosine, it sees a wrong scale."""
    t, r = map(_flat, _pair(test, ref, what))
    nr = r.norm(dim=1)
    bad = _zero_rows(nr)
    if bad:
        raise MetricError(f"{what}: ref has zero norm at {_samples(bad)}; relative error is undefined")
    return ((t - r).norm(dim=1) / nr).numpy()


def sqnr_db(test, ref, *, what: str = "tensor") -> np.ndarray:
    """Per-sample 10*log10(||ref||^2 / ||ref - test||^2) in dB, capped at SQNR_CAP_DB; (B,) float64."""
    t, r = map(_flat, _pair(test, ref, what))
    signal = (r * r).sum(dim=1)
    noise = ((r - t) ** 2).sum(dim=1)
    bad = _zero_rows(signal)
    if bad:
        raise MetricError(f"{what}: ref has zero norm at {_samples(bad)}; SQNR is undefined")
    out = np.empty(t.shape[0], dtype=np.float64)
    for i, (s, n) in enumerate(zip(signal.tolist(), noise.tolist())):
        if not (math.isfinite(s) and math.isfinite(n)):
            # Squares of huge values overflow float64; inf signal would otherwise read as a capped "perfect" score.
            raise MetricError(f"{what}: sample {i} energy overflows float64 (signal {s}, noise {n})")
        out[i] = SQNR_CAP_DB if n == 0 else min(10.0 * math.log10(s / n), SQNR_CAP_DB)
    return out


def max_abs_error(test, ref, *, what: str = "tensor") -> np.ndarray:
    """Per-sample max |test - ref|; (B,) float64."""
    t, r = map(_flat, _pair(test, ref, what))
    return (t - r).abs().amax(dim=1).numpy()


def trajectory_cosine(test_steps, ref_steps, *, what: str = "trajectory") -> np.ndarray:
    """Cosine per step and per sample of (steps, B, ...) inputs; (steps, B) float64."""
    t, r = _pair(test_steps, ref_steps, what, min_dims=2)
    steps, batch = t.shape[:2]
    rows = _cosine_rows(t.reshape(steps * batch, -1), r.reshape(steps * batch, -1), what,
                        lambda i: "step {} sample {}".format(*divmod(i, batch)))
    return rows.reshape(steps, batch).numpy()


# ---------------------------------------------------------------- image metrics

def check_images(images, what: str) -> np.ndarray:
    """Return `images` as a uint8 (B, F, H, W, 3) numpy array if it is a non-empty uint8 batch of media, else raise
    MetricError. Media are (B, F, H, W, 3) with F = 1 for images; a (B, H, W, 3) batch is read as F = 1. Every
    metric below gives one value per sample, computed over all of its frames."""
    a = np.asarray(images)
    # Float images have an ambiguous range (0..1 or 0..255): refuse them instead of guessing.
    if a.dtype != np.uint8:
        raise MetricError(f"{what} must be uint8 (B, F, H, W, 3), got dtype {a.dtype}")
    if a.ndim == 4 and a.shape[-1] == 3:
        a = a[:, None]
    if a.ndim != 5 or a.shape[-1] != 3:
        raise MetricError(f"{what} must be (B, F, H, W, 3) or (B, H, W, 3), got shape {a.shape}")
    if a.size == 0:
        raise MetricError(f"{what} are empty (shape {a.shape})")
    return a


def _images(test, ref) -> tuple[np.ndarray, np.ndarray]:
    t, r = check_images(test, "test images"), check_images(ref, "ref images")
    if t.shape != r.shape:
        raise MetricError(f"image shape mismatch: test {t.shape} vs ref {r.shape}")
    return t, r


def psnr_db(test, ref) -> np.ndarray:
    """Per-sample PSNR in dB over 0..255 (the MSE over all frames), capped at PSNR_CAP_DB; (B,) float64."""
    t, r = _images(test, ref)
    # Identical images are capped before skimage sees them: it would divide by zero (a RuntimeWarning) for inf.
    vals = [PSNR_CAP_DB if np.array_equal(ti, ri) else peak_signal_noise_ratio(ri, ti, data_range=255)
            for ti, ri in zip(t, r)]
    return np.minimum(np.asarray(vals, dtype=np.float64), PSNR_CAP_DB)


def ssim(test, ref) -> np.ndarray:
    """Per-sample SSIM (skimage, uniform window, channel_axis=-1, data_range=255), the mean over frames; (B,) float64.

    The window is skimage's default 7x7, shrunk to the largest odd size that fits images smaller than 7 pixels
    on a side (skimage raises otherwise); images under 3x3 are rejected because SSIM is meaningless there.
    """
    t, r = _images(test, ref)
    side = min(t.shape[2], t.shape[3])
    if side < 3:
        raise MetricError(f"images of {t.shape[2]}x{t.shape[3]} are too small for SSIM (need at least 3x3)")
    win = min(SSIM_WIN_SIZE, side if side % 2 else side - 1)
    vals = [np.mean([structural_similarity(rf, tf, channel_axis=-1, data_range=255, win_size=win)
                     for tf, rf in zip(ti, ri)]) for ti, ri in zip(t, r)]
    return np.asarray(vals, dtype=np.float64)


def mean_abs_diff(test, ref) -> np.ndarray:
    """Per-sample mean |test - ref| over all frames, in 0..255 units; (B,) float64."""
    t, r = _images(test, ref)
    diff = np.abs(t.astype(np.int16) - r.astype(np.int16))  # int16: uint8 subtraction would wrap around
    return diff.reshape(diff.shape[0], -1).mean(axis=1, dtype=np.float64)


# ---------------------------------------------------------------- video (F > 1) metrics
# The image metrics above pool all frames of a sample; a video can hide one bad frame in that pool, and frame-order
# errors (two frames swapped, the video shifted by a frame) keep every frame plausible. These judge frames one by
# one and the motion between them. All are (B,) float64 per sample, over the frames of that sample.

def frame_psnr_db(test, ref) -> np.ndarray:
    """(B, F) PSNR of each frame, capped at PSNR_CAP_DB."""
    t, r = _images(test, ref)
    return np.stack([psnr_db(t[:, f], r[:, f]) for f in range(t.shape[1])], axis=1)


def frame_ssim(test, ref) -> np.ndarray:
    """(B, F) SSIM of each frame (the window of `ssim`)."""
    t, r = _images(test, ref)
    return np.stack([ssim(t[:, f], r[:, f]) for f in range(t.shape[1])], axis=1)


def frame_mean_abs_diff(test, ref) -> np.ndarray:
    """(B, F) mean |test - ref| of each frame in 0..255 units."""
    t, r = _images(test, ref)
    diff = np.abs(t.astype(np.int16) - r.astype(np.int16))
    return diff.reshape(*diff.shape[:2], -1).mean(axis=2, dtype=np.float64)


def frame_diff_cosine_min(test, ref) -> np.ndarray:
    """Cosine of the frame-to-frame differences (frame f+1 - frame f, float64 pixels) of test and ref, the minimum
    over consecutive pairs: motion in the wrong order or place scores low even where every frame is right."""
    t, r = _images(test, ref)
    if t.shape[1] < 2:
        raise MetricError(f"frame differences need >= 2 frames, got {t.shape[1]}")
    td = torch.from_numpy(np.diff(t.astype(np.float64), axis=1))
    rd = torch.from_numpy(np.diff(r.astype(np.float64), axis=1))
    b, pairs = td.shape[:2]
    td, rd = td.reshape(b * pairs, -1), rd.reshape(b * pairs, -1)
    # A still pair (zero difference) has no direction: equal on both sides it is exactly right (1); still on one
    # side only, it shares nothing with the other's motion (0), which is what a repeated or dropped frame looks like.
    nt, nr = td.norm(dim=1), rd.norm(dim=1)
    cos = ((td * rd).sum(dim=1) / (nt * nr).clamp_min(torch.finfo(torch.float64).tiny)).clamp(-1.0, 1.0)
    cos = torch.where((nt == 0) | (nr == 0), torch.zeros_like(cos), cos)
    cos = torch.where((td == rd).all(dim=1), torch.ones_like(cos), cos)
    return cos.reshape(b, pairs).min(dim=1).values.numpy()


def frame_latent_cosine_min(test, ref, frames: int, *, what: str = "final latents") -> np.ndarray:
    """Cosine of each latent frame of (B, N, C) latents whose N tokens are `frames` equal runs (frame-major), the
    minimum over frames."""
    t, r = _pair(test, ref, what, min_dims=2)
    if frames < 1 or t.shape[1] % frames:
        raise MetricError(f"{what}: {t.shape[1]} tokens do not split into {frames} latent frames")
    b = t.shape[0]
    cos = _cosine_rows(t.reshape(b * frames, -1), r.reshape(b * frames, -1), what,
                       where=lambda i: f"sample {i // frames} latent frame {i % frames}")
    return cos.reshape(b, frames).min(dim=1).values.numpy()


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class MetricSpec:
    """What a metric name means to the gate and the report.

    absolute: the gate compares |value| against the threshold (for signed deltas whose ideal is 0); together
    with higher_is_better=False that reads "|value| <= threshold".
    per_step: rows carry a `step` index (one value per denoising step) rather than one value per sample.
    """
    name: str
    higher_is_better: bool
    gated: bool
    unit: str
    description: str
    absolute: bool = False
    per_step: bool = False
    # The value the metric gives, exactly, when test and ref are identical (bitwise): what the gate's exactness tier
    # demands (harness/thresholds.py, `exact = true`). None: no such guarantee (CLIP embeds each image through a
    # batched network), so an exact tier leaves that metric to its ordinary threshold. tests/test_metrics.py checks
    # every value on identical inputs.
    identical: float | None = None
    # Rows only for video cells (media of more than one frame; a cell is one when its sampling object has
    # num_frames > 1): the sweep adds them for F > 1, and a run's expected rows count them only there.
    video: bool = False
    # What the metric compares: "media" (a diffusion run's latents and images) or "tokens" (a token family's
    # embedder outputs, logits and greedy tokens: harness/token_sweep.py). A run expects the metrics of its kind.
    output: str = "media"


def _registry(*specs: MetricSpec) -> dict[str, MetricSpec]:
    out: dict[str, MetricSpec] = {}
    for s in specs:
        if s.name in out:
            raise ValueError(f"duplicate metric name {s.name!r}")
        out[s.name] = s
    return out


METRICS: dict[str, MetricSpec] = _registry(
    MetricSpec("single_step_cosine", True, True, "",
               "cosine of one transformer forward's guided prediction, same inputs; catches layout bugs that "
               "residual paths hide in final latents", identical=1.0),
    MetricSpec("single_step_rel_error", False, True, "", "||test - ref|| / ||ref|| of one guided prediction",
               identical=0.0),
    MetricSpec("single_step_sqnr_db", True, True, "dB", "SQNR of one guided prediction, capped at 200 dB",
               identical=SQNR_CAP_DB),
    MetricSpec("conditioning_cosine", True, True, "",
               "cosine of what each side feeds its denoiser as conditioning at step 0 (text features, pooled "
               "embeddings; the negative branch's too), the worst tensor the family declares (harness/"
               "conditioning.py): a text-path bug a tiny denoiser hides in its output", identical=1.0),
    MetricSpec("conditioning_rel_error", False, True, "",
               "||test - ref|| / ||ref|| of the step-0 conditioning, the worst tensor (sees a scale cosine misses)",
               identical=0.0),
    MetricSpec("final_latent_cosine", True, True, "", "cosine of the final denoised latents", identical=1.0),
    MetricSpec("final_latent_rel_error", False, True, "", "||test - ref|| / ||ref|| of the final latents",
               identical=0.0),
    MetricSpec("final_latent_sqnr_db", True, True, "dB", "SQNR of the final latents, capped at 200 dB",
               identical=SQNR_CAP_DB),
    MetricSpec("trajectory_cosine", True, False, "",
               "cosine of the latents after each step (informational curve; its minimum is gated)", per_step=True),
    MetricSpec("trajectory_cosine_min", True, True, "", "minimum over steps of trajectory_cosine", identical=1.0),
    MetricSpec("step_output_cosine_min", True, True, "",
               "minimum over steps of the per-step guided prediction cosine", identical=1.0),
    MetricSpec("psnr_db", True, True, "dB", "PSNR of the decoded uint8 images, capped at 100 dB",
               identical=PSNR_CAP_DB),
    MetricSpec("ssim", True, True, "", "SSIM of the decoded uint8 images (7x7 uniform window)", identical=1.0),
    MetricSpec("mean_abs_diff", False, True, "/255", "mean absolute pixel difference in 0..255 units", identical=0.0),
    MetricSpec("clip_score_test", True, False, "",
               "CLIPScore 100*max(cos, 0) of the test image and its prompt (informational)"),
    MetricSpec("clip_score_ref", True, False, "",
               "CLIPScore 100*max(cos, 0) of the reference image and its prompt (informational)"),
    MetricSpec("clip_score_delta", False, True, "",
               "clip_score_test - clip_score_ref; the gate compares its absolute value", absolute=True),
    MetricSpec("clip_image_similarity", True, True, "", "cosine of the CLIP image embeddings of test and ref"),
    MetricSpec("weight_sqnr_db_min", True, True, "dB",
               "L0: minimum over quantized linears of the SQNR of the dequantized weight vs the bf16 checkpoint "
               "(one value per cell; per-layer values in weights.csv)"),
    MetricSpec("layer_output_rel_error", False, True, "",
               "quant oracle: ||engine - torchao|| / ||torchao|| of one quantized linear's output on captured input "
               "rows (one row per layer, column `layer`; harness/quant_oracle.py)"),
    MetricSpec("layer_set_mismatch", False, True, "",
               "quantized layers that were asked to stay unquantized, plus ignore patterns that matched no layer "
               "(one row per quant cell; the sets in quant_layers.csv)"),
    MetricSpec("video_psnr_db_min", True, True, "dB", "PSNR of the worst frame (per-frame, capped at 100 dB)",
               identical=PSNR_CAP_DB, video=True),
    MetricSpec("video_psnr_db_mean", True, False, "dB", "mean over frames of the per-frame PSNR", video=True),
    MetricSpec("video_ssim_min", True, True, "", "SSIM of the worst frame", identical=1.0, video=True),
    MetricSpec("video_ssim_mean", True, False, "", "mean over frames of the per-frame SSIM", video=True),
    MetricSpec("video_mad_max", False, True, "/255", "mean absolute pixel difference of the worst frame",
               identical=0.0, video=True),
    MetricSpec("video_mad_mean", False, False, "/255", "mean over frames of the per-frame mean absolute difference", video=True),
    MetricSpec("frame_diff_cosine_min", True, True, "",
               "cosine of consecutive-frame pixel differences, test vs ref, the worst pair: catches frame order "
               "and offset errors", identical=1.0, video=True),
    MetricSpec("frame_latent_cosine_min", True, True, "",
               "cosine of each latent frame of the final latents, the worst frame", identical=1.0, video=True),
    MetricSpec("metric_crosscheck_error", False, True, "",
               "self-check: worst disagreement of the run's metrics with exact or independently recomputed values "
               "(harness/selfcheck.py); relative, 0 when every metric is computed right"),
)


def metric_spec(name: str) -> MetricSpec:
    """Look up a metric by name; unknown names fail with the valid names and the closest match."""
    try:
        return METRICS[name]
    except KeyError:
        close = difflib.get_close_matches(name, METRICS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown metric {name!r}.{hint} Valid metrics: {', '.join(METRICS)}") from None


# ---------------------------------------------------------------- token-logits metrics (harness/token_metrics.py)
# Language-model families (engine.family.TokenFamily) are compared on logits and tokens, not latents and images.
TOKEN_LOGITS_METRICS = (
    MetricSpec("embedder_cosine_min", True, True, "",
               "worst row's cosine of one embedder's output (every soft-token row, padding rows included); "
               "column `layer` names the embedder", identical=1.0, output="tokens"),
    MetricSpec("embedder_rel_error", False, True, "",
               "||test - ref|| / ||ref|| of one embedder's output (catches a uniform scale cosine misses)",
               identical=0.0, output="tokens"),
    MetricSpec("logits_cosine_min", True, True, "", "worst position's cosine of the last layer's logits",
               identical=1.0, output="tokens"),
    MetricSpec("top1_agreement", True, True, "", "share of positions whose argmax token agrees", identical=1.0,
               output="tokens"),
    MetricSpec("next_token_kl_max", False, True, "nats",
               "worst position's KL(reference || test) of the next-token distribution", identical=0.0, output="tokens"),
    MetricSpec("greedy_match_rate", True, True, "",
               "share of the greedy continuation's tokens equal position by position", identical=1.0, output="tokens"),
)
for _spec in TOKEN_LOGITS_METRICS:
    if _spec.name in METRICS:
        raise ValueError(f"duplicate metric name {_spec.name!r}")
    METRICS[_spec.name] = _spec
