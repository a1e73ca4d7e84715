"""Video metrics (harness/metrics.py, F > 1): frame-order and frame-offset errors, which keep every frame plausible,
must score clearly worse than a correct video; a bad frame must show in the worst-frame value even where the pooled
value hides it."""
import numpy as np
import pytest
import torch

from harness import metrics as M
from harness.metrics import MetricError


def smooth_video(frames=5, seed=0):
    """A moving pattern: consecutive frames differ by a small shift, as real video does."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(1, 24, 40, 3)).astype(np.float64)
    base = (base + np.roll(base, 1, 1) + np.roll(base, 1, 2)) / 3
    return np.stack([np.roll(base, 2 * f, axis=2) for f in range(frames)], axis=1).round().astype(np.uint8)


def test_swapped_and_offset_frames_fail_the_temporal_check():
    ref = smooth_video()
    swapped = ref.copy()
    swapped[:, [1, 2]] = ref[:, [2, 1]]
    offset = np.concatenate([ref[:, :1], ref[:, :-1]], axis=1)  # every frame one late (the first repeated)
    assert M.frame_diff_cosine_min(ref, ref.copy())[0] == 1.0
    assert M.frame_diff_cosine_min(swapped, ref)[0] < 0.0  # the motion reverses between the swapped frames
    assert M.frame_diff_cosine_min(offset, ref)[0] < 0.5
    # The worst frame shows a swap that the pooled value dilutes.
    assert M.frame_psnr_db(swapped, ref).min() < M.psnr_db(swapped, ref)[0]
    assert M.frame_mean_abs_diff(swapped, ref).max() > M.mean_abs_diff(swapped, ref)[0]
    assert M.frame_ssim(swapped, ref).min() < M.ssim(swapped, ref)[0]


def test_frame_latent_cosine_finds_a_bad_latent_frame():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3 * 8, 4, generator=g)  # 3 latent frames of 8 tokens
    bad = ref.clone()
    bad[1, 8:16] = ref[1, 16:24]  # sample 1: latent frame 1 replaced by frame 2
    got = M.frame_latent_cosine_min(bad, ref, 3)
    assert got[0] == 1.0 and got[1] < 0.9
    assert M.cosine(bad, ref)[1] > got[1]  # the whole-tensor cosine hides it better


def test_bad_video_inputs_are_clear_errors():
    one = smooth_video(frames=1)
    with pytest.raises(MetricError, match=">= 2 frames"):
        M.frame_diff_cosine_min(one, one)
    with pytest.raises(MetricError, match="latent frames"):
        M.frame_latent_cosine_min(torch.ones(1, 10, 2), torch.ones(1, 10, 2), 3)
    still = np.repeat(smooth_video(frames=1), 3, axis=1)  # a still video: equal stillness is right, one-sided not
    assert M.frame_diff_cosine_min(still, still)[0] == 1.0
    assert M.frame_diff_cosine_min(still, smooth_video(frames=3))[0] == 0.0
