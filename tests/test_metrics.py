"""Metric functions, the metric registry and the CLIP scorer (tiny random model, CPU, offline)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import metrics as M
from harness.metrics import MetricError

TENSOR_METRICS = (M.cosine, M.rel_error, M.sqnr_db, M.max_abs_error)
IMAGE_METRICS = (M.psnr_db, M.ssim, M.mean_abs_diff)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images(b=2, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- tensor metrics

def test_identical_tensors():
    x = randn(3, 4, 8, 8)
    for fn in TENSOR_METRICS:
        out = fn(x, x.clone())
        assert out.dtype == np.float64 and out.shape == (3,)
    np.testing.assert_array_equal(M.cosine(x, x), 1.0)
    np.testing.assert_array_equal(M.rel_error(x, x), 0.0)
    np.testing.assert_array_equal(M.sqnr_db(x, x), M.SQNR_CAP_DB)
    np.testing.assert_array_equal(M.max_abs_error(x, x), 0.0)


def test_analytic_cases():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    b = torch.tensor([[0.0, 5.0, 0.0], [2.0, 4.0, 6.0]])  # row 0 orthogonal, row 1 scaled by 2
    np.testing.assert_allclose(M.cosine(a, b), [0.0, 1.0], atol=1e-15)
    # Cosine is blind to scale; relative error and SQNR are not.
    np.testing.assert_allclose(M.rel_error(a, b)[1], 0.5)
    np.testing.assert_allclose(M.sqnr_db(a, b)[1], 10 * math.log10(4.0))  # ||b||^2 / ||b - a||^2 = 4
    np.testing.assert_allclose(M.max_abs_error(a, b), [5.0, 3.0])
    np.testing.assert_allclose(M.cosine(a, -a), [-1.0, -1.0])


def test_sqnr_matches_noise_level():
    ref = randn(2, 10_000)
    test = ref + 0.01 * randn(2, 10_000, seed=1)
    np.testing.assert_allclose(M.sqnr_db(test, ref), 40.0, atol=0.5)


def test_bf16_inputs_are_computed_in_float64():
    x = randn(2, 64).bfloat16()
    assert M.cosine(x, x).dtype == np.float64
    np.testing.assert_array_equal(M.cosine(x, x), 1.0)


def test_one_bad_sample_shows_up_per_sample():
    ref = randn(4, 256)
    test = ref.clone()
    test[2] = randn(256, seed=7)
    cos = M.cosine(test, ref)
    assert cos.argmin() == 2 and cos.min() < 0.5
    np.testing.assert_array_equal(np.delete(cos, 2), 1.0)
    assert M.rel_error(test, ref).argmax() == 2
    assert M.sqnr_db(test, ref).argmin() == 2


@pytest.mark.parametrize("fn", TENSOR_METRICS)
@pytest.mark.parametrize("bad,counts", [(float("nan"), "1 NaN and 0 Inf"), (float("-inf"), "0 NaN and 1 Inf")])
def test_non_finite_is_an_error(fn, bad, counts):
    ref = randn(2, 16)
    test = ref.clone()
    test[1, 3] = bad
    with pytest.raises(MetricError, match=f"test tensor contains {counts} values"):
        fn(test, ref)
    with pytest.raises(MetricError, match="ref tensor"):
        fn(ref, test)


def test_check_finite_message():
    x = torch.zeros(4096)
    x[:12] = float("nan")
    with pytest.raises(MetricError, match=r"engine final_latents contains 12 NaN and 0 Inf values \(of 4096\)"):
        M.check_finite(x, "engine final_latents")
    M.check_finite(torch.arange(3), "integers")  # integers cannot be non-finite


@pytest.mark.parametrize("fn", TENSOR_METRICS)
def test_empty_shape_mismatch_and_scalar(fn):
    with pytest.raises(MetricError, match="empty"):
        fn(torch.empty(0, 4), torch.empty(0, 4))
    with pytest.raises(MetricError, match=r"shape mismatch.*\(2, 4\).*\(2, 5\)"):
        fn(randn(2, 4), randn(2, 5))
    with pytest.raises(MetricError, match="batch first"):
        fn(torch.tensor(1.0), torch.tensor(1.0))


def test_zero_norm_is_undefined_not_zero_or_one():
    ref = randn(3, 8)
    zero = ref.clone()
    zero[1] = 0
    with pytest.raises(MetricError, match=r"test has zero norm at sample 1; cosine is undefined"):
        M.cosine(zero, ref)
    with pytest.raises(MetricError, match=r"ref has zero norm at sample 1"):
        M.cosine(ref, zero)
    with pytest.raises(MetricError, match="relative error is undefined"):
        M.rel_error(ref, zero)
    with pytest.raises(MetricError, match="SQNR is undefined"):
        M.sqnr_db(ref, zero)


def test_trajectory_cosine():
    ref = randn(5, 3, 4, 4)
    test = ref.clone()
    test[3, 1] = -test[3, 1]
    out = M.trajectory_cosine(test, ref)
    assert out.shape == (5, 3) and out.dtype == np.float64
    assert out[3, 1] == pytest.approx(-1.0, abs=1e-15)
    np.testing.assert_allclose(np.delete(out.ravel(), 3 * 3 + 1), 1.0, atol=1e-15)
    ref[2, 0] = 0
    with pytest.raises(MetricError, match="step 2 sample 0"):
        M.trajectory_cosine(test, ref)
    with pytest.raises(MetricError, match="at least 2 dims"):
        M.trajectory_cosine(randn(5), randn(5))


# ---------------------------------------------------------------- image metrics

def test_psnr_capped_on_identical_and_finite_otherwise():
    a = images()
    np.testing.assert_array_equal(M.psnr_db(a, a.copy()), M.PSNR_CAP_DB)
    b = a.copy()
    b[1, 0, 0, 0] ^= 0x80  # one pixel of one image changed: only that image drops
    p = M.psnr_db(b, a)
    assert p[0] == M.PSNR_CAP_DB and np.isfinite(p[1]) and p[1] < M.PSNR_CAP_DB
    noisy = M.psnr_db(images(seed=1), a)
    assert np.isfinite(noisy).all() and (noisy < 15).all()


def test_ssim_identical_and_noise():
    a = images()
    np.testing.assert_allclose(M.ssim(a, a), 1.0, atol=1e-12)
    assert (M.ssim(images(seed=1), a) < 0.5).all()


def test_ssim_small_images():
    a = images(h=5, w=32)  # smaller than the default 7x7 window
    assert M.ssim(images(h=5, w=32, seed=1), a).shape == (2,)
    with pytest.raises(MetricError, match="too small"):
        M.ssim(images(h=2, w=32), images(h=2, w=32))


def test_mean_abs_diff_units():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255  # uint8 wrap-around would give 1, not 255
    np.testing.assert_array_equal(M.mean_abs_diff(a, b), [0.0, 255.0])
    np.testing.assert_array_equal(M.mean_abs_diff(b, a), [0.0, 255.0])


@pytest.mark.parametrize("fn", IMAGE_METRICS)
def test_image_inputs_rejected(fn):
    a = images()
    with pytest.raises(MetricError, match="uint8"):
        fn(a.astype(np.float32), a)
    with pytest.raises(MetricError, match="shape mismatch"):
        fn(a, images(h=16))
    with pytest.raises(MetricError, match=r"\(B, H, W, 3\)"):
        fn(a[0], a[0])
    with pytest.raises(MetricError, match="empty"):
        fn(a[:0], a[:0])


# ---------------------------------------------------------------- registry

def test_registry_names_and_flags():
    assert set(M.METRICS) == {
        "single_step_cosine", "single_step_rel_error", "single_step_sqnr_db", "final_latent_cosine",
        "conditioning_cosine", "conditioning_rel_error",  # step-0 conditioning: harness/conditioning.py
        "final_latent_rel_error", "final_latent_sqnr_db", "trajectory_cosine", "trajectory_cosine_min",
        "step_output_cosine_min", "psnr_db", "ssim", "mean_abs_diff", "clip_score_test", "clip_score_ref",
        "clip_score_delta", "clip_image_similarity", "weight_sqnr_db_min", "metric_crosscheck_error",
        "layer_output_rel_error", "layer_set_mismatch",
        # video (F > 1): tests/test_video_metrics.py
        "video_psnr_db_min", "video_psnr_db_mean", "video_ssim_min", "video_ssim_mean", "video_mad_max",
        "video_mad_mean", "frame_diff_cosine_min", "frame_latent_cosine_min",
        # token-logits metrics (harness/token_metrics.py)
        "embedder_cosine_min", "embedder_rel_error", "logits_cosine_min", "top1_agreement", "next_token_kl_max",
        "greedy_match_rate",
    }
    assert all(name == spec.name for name, spec in M.METRICS.items())
    assert not M.metric_spec("trajectory_cosine").gated and M.metric_spec("trajectory_cosine").per_step
    assert not M.metric_spec("clip_score_test").gated and not M.metric_spec("clip_score_ref").gated
    delta = M.metric_spec("clip_score_delta")
    assert delta.gated and delta.absolute and not delta.higher_is_better
    assert not M.metric_spec("mean_abs_diff").higher_is_better
    assert M.metric_spec("trajectory_cosine_min").gated and M.metric_spec("step_output_cosine_min").gated


def test_unknown_metric_suggests():
    with pytest.raises(KeyError, match=r"unknown metric 'final_latent_cosin'.*Did you mean 'final_latent_cosine'"):
        M.metric_spec("final_latent_cosin")
    with pytest.raises(KeyError, match="Valid metrics: single_step_cosine"):
        M.metric_spec("zzz")


# ---------------------------------------------------------------- CLIP

@pytest.fixture(scope="module")
def scorer():
    from harness.clip import ClipScorer
    return ClipScorer.default()


def test_clip_default_is_labelled_non_semantic(scorer):
    assert scorer.semantic is False and scorer.name == "parity-tiny-clip"
    assert scorer.provenance() == {"clip_model": "parity-tiny-clip", "clip_semantic": False}


def test_clip_build_is_deterministic_and_keeps_global_rng():
    from harness import clip
    state = torch.random.get_rng_state()
    first, _, _ = clip._build_tiny()
    second, _, _ = clip._build_tiny()  # uncached: a genuinely fresh init
    assert torch.equal(state, torch.random.get_rng_state())
    for (k, v), w in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(v, w), k
    fresh = clip.ClipScorer(first, *clip._tiny_parts()[1:], name=clip.TINY_NAME, semantic=False)
    a = images(3)
    np.testing.assert_array_equal(fresh.image_image_similarity(a, images(3, seed=1)),
                                  clip.ClipScorer.default().image_image_similarity(a, images(3, seed=1)))


def test_clip_image_similarity(scorer):
    a, b = images(3), images(3, seed=1)
    np.testing.assert_allclose(scorer.image_image_similarity(a, a.copy()), 1.0, atol=1e-6)
    sim = scorer.image_image_similarity(a, b)
    assert sim.shape == (3,) and (sim < 1 - 1e-4).all()
    flat = np.zeros_like(a)
    flat[1] = 255
    assert (scorer.image_image_similarity(a, flat) < sim).all()  # further from noise than other noise is


def test_clip_text_image_score(scorer):
    a = images(2)
    s1 = scorer.text_image_score(a, ["a red cube", "a photo of a cat"])
    s2 = scorer.text_image_score(a.copy(), ["a red cube", "a photo of a cat"])
    assert s1.shape == (2,) and (s1 >= 0).all() and (s1 <= 100).all()
    np.testing.assert_array_equal(s1, s2)
    with pytest.raises(MetricError, match="2 images but 1 prompts"):
        scorer.text_image_score(a, ["one"])
    with pytest.raises(MetricError, match="uint8"):
        scorer.text_image_score(a.astype(np.float32), ["a", "b"])
    with pytest.raises(MetricError, match=r"\(B, H, W, 3\)"):
        scorer.image_image_similarity(a[0], a[0])


def test_clip_memo_changes_no_value():
    """A scorer reuses the embeddings of inputs it has seen (a sweep scores the same prompts and reference images in
    every cell): each must equal a fresh scorer's first computation; another input of the same shape must miss."""
    from harness import clip
    memo, fresh = (clip.ClipScorer(*clip._tiny_parts(), name=clip.TINY_NAME, semantic=False) for _ in range(2))
    a, b, prompts = images(2), images(2, seed=1), ["a red cube", "a photo of a cat"]
    first = memo.text_image_score(a, prompts)
    again, other = memo.text_image_score(a.copy(), prompts), memo.text_image_score(b, prompts)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(other, fresh.text_image_score(b, prompts))
    assert not np.array_equal(other, first)
    np.testing.assert_array_equal(memo.text_image_score(a, prompts[::-1]), fresh.text_image_score(a, prompts[::-1]))
    emb = memo.embed_images(a)
    emb.zero_()  # a caller writing into what it got back must not change the memo
    np.testing.assert_array_equal(memo.embed_images(a), fresh.embed_images(a))


def test_clip_from_pretrained_local_file(scorer, tmp_path):
    from harness.clip import ClipScorer, _register_tiny_config
    path = tmp_path / "tiny.pt"
    torch.save(scorer.model.state_dict(), path)
    real = ClipScorer.from_pretrained(_register_tiny_config(), str(path))
    assert real.semantic is True and real.name == "clip_tiny:tiny.pt"
    a, b = images(2), images(2, seed=1)
    np.testing.assert_allclose(real.image_image_similarity(a, b), scorer.image_image_similarity(a, b), atol=1e-12)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipScorer.from_pretrained("ViT-B-32", str(tmp_path / "missing.pt"))


def test_media_are_batches_of_frames():
    """(B, F, H, W, 3): one value per sample over all its frames; F = 1 gives exactly the (B, H, W, 3) values."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    for metric in (M.psnr_db, M.ssim, M.mean_abs_diff):
        assert np.array_equal(metric(a[:, None], b[:, None]), metric(a, b)), metric.__name__
    # Two frames: frame 0 identical, frame 1 noisy. PSNR uses the MSE over both frames, SSIM and MAD average them.
    video_a, video_b = np.stack([a, a], 1), np.stack([a, b], 1)
    mse = ((a.astype(float) - b) ** 2).reshape(2, -1).mean(1) / 2
    np.testing.assert_allclose(M.psnr_db(video_a, video_b), 10 * np.log10(255**2 / mse))
    np.testing.assert_allclose(M.ssim(video_a, video_b), (1 + M.ssim(a, b)) / 2)
    np.testing.assert_allclose(M.mean_abs_diff(video_a, video_b), M.mean_abs_diff(a, b) / 2)
    with pytest.raises(MetricError, match=r"\(B, F, H, W, 3\)"):
        M.psnr_db(a[None, None], b[None, None])


def test_clip_scores_media_per_sample_over_frames(scorer):
    a = images(2)
    b = images(2, seed=1)
    prompts = ["a red cube", "a blue sphere"]
    assert np.array_equal(scorer.text_image_score(a[:, None], prompts), scorer.text_image_score(a, prompts))
    assert np.array_equal(scorer.image_image_similarity(a[:, None], b[:, None]), scorer.image_image_similarity(a, b))
    # Frames go through the encoder as one batch of B*F: a bigger batch may block the float32 GEMMs differently,
    # hence a float32-sized tolerance rather than equality.
    video = np.stack([a, b], 1)
    expected = (scorer.text_image_score(a, prompts) + scorer.text_image_score(b, prompts)) / 2
    np.testing.assert_allclose(scorer.text_image_score(video, prompts), expected, rtol=1e-5)
    np.testing.assert_allclose(scorer.image_image_similarity(video, np.stack([a, a], 1)),
                               (1 + scorer.image_image_similarity(b, a)) / 2, rtol=1e-5)
