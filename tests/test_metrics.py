"""pyoco.metrics: Fréchet distance against scipy's sqrtm, motion gap, FVD with CI, intervals and class score."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from pyoco import metrics


def _random_gaussian(rng: np.random.Generator, dim: int):
    a = rng.standard_normal((dim, dim))
    sigma = a @ a.T / dim + 0.1 * np.eye(dim)
    return rng.standard_normal(dim), sigma


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 4, 32, 64])
def test_frechet_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    for _ in range(3):
        mu1, s1 = _random_gaussian(rng, dim)
        mu2, s2 = _random_gaussian(rng, dim)
        ours = metrics.frechet_distance(mu1, s1, mu2, s2)
        ref = _scipy_frechet(mu1, s1, mu2, s2)
        assert ours == pytest.approx(ref, rel=1e-4)


def test_frechet_of_feature_sets_matches_scipy_and_is_zero_for_identical_sets():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 16))
    fake = 0.5 * rng.standard_normal((150, 16)) + 0.3
    mu1, s1 = np.mean(real, 0), np.cov(real, rowvar=False)
    mu2, s2 = np.mean(fake, 0), np.cov(fake, rowvar=False)
    ours = metrics.frechet_distance_features(real, torch.from_numpy(fake))
    assert ours == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-4)
    assert metrics.frechet_distance_features(real, real) == pytest.approx(0.0, abs=1e-8)


def test_frechet_closed_form_for_diagonal_covariances():
    # For commuting (diagonal) covariances tr((S1 S2)^1/2) = sum sqrt(s1_i s2_i), so
    # d^2 = |mu1 - mu2|^2 + sum (sqrt(s1_i) - sqrt(s2_i))^2 exactly.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_rejects_bad_shapes_and_too_few_samples():
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(np.zeros((1, 4)))


def test_temporal_consistency_known_values():
    still = np.full((2, 5, 4, 4, 3), 77, dtype=np.uint8)
    assert metrics.temporal_consistency(still) == 0.0
    flicker = np.zeros((1, 3, 2, 2, 3), dtype=np.uint8)
    flicker[:, 1] = 255  # 0 -> 255 -> 0: every pixel changes by 1.0 at both transitions
    assert metrics.temporal_consistency(flicker) == pytest.approx(1.0)
    half = np.zeros((1, 2, 2, 2, 3), dtype=np.uint8)
    half[:, 1, :1] = 255  # half the pixels change fully once
    assert metrics.frame_differences(half).tolist() == pytest.approx([0.5])
    assert metrics.temporal_consistency(np.zeros((3, 1, 2, 2, 3), np.uint8)) == 0.0
    with pytest.raises(ValueError, match="uint8 videos"):
        metrics.temporal_consistency(np.zeros((1, 2, 2, 2, 3), np.float32))


def test_wasserstein_1d_matches_scipy_and_known_values():
    import scipy.stats

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(50), 0.5 * rng.standard_normal(37) + 0.7
    assert metrics.wasserstein_1d(a, b) == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-12)
    # a point mass at 0 vs one at 0.3: W1 = 0.3; a sample against itself: 0
    assert metrics.wasserstein_1d(np.zeros(4), np.full(3, 0.3)) == pytest.approx(0.3)
    assert metrics.wasserstein_1d(a, a) == 0.0


def test_frozen_video_scores_worse_on_motion_gap_than_real_clips():
    """Real clips: a shape moving 1-2 px per frame. Real vs real (two halves) is the reference; the same
    clips with their first frame frozen must be much further from the real ones."""
    rng = np.random.default_rng(0)
    videos = np.full((40, 6, 16, 16, 3), 20, np.uint8)
    for i in range(40):
        y, x, v = int(rng.integers(0, 12)), int(rng.integers(0, 4)), 1 + (i // 2) % 2
        for t in range(6):
            videos[i, t, y : y + 4, x + v * t : x + v * t + 4] = (230, 40, 90)
    frozen = np.repeat(videos[:, :1], 6, axis=1)
    real_vs_real = metrics.motion_gap(videos[::2], videos[1::2])
    frozen_gap = metrics.motion_gap(frozen, videos)
    assert metrics.temporal_consistency(frozen) == 0.0  # the old "quality" score called this perfect
    assert frozen_gap == pytest.approx(
        metrics.temporal_consistency(videos), rel=1e-9
    )  # W1 to a point mass at 0
    assert frozen_gap > 10 * max(real_vs_real, 1e-4), (frozen_gap, real_vs_real)


def test_fvd_refuses_fewer_than_32_videos_and_gives_a_ci_around_the_value():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((64, 8))
    with pytest.raises(ValueError, match="at least 32 generated videos"):
        metrics.fvd_from_features(real, rng.standard_normal((31, 8)))
    fake = rng.standard_normal((32, 8)) + 1.0
    r = metrics.fvd_from_features(real, fake, num_bootstrap=100, seed=0)
    assert r["num_videos"] == 32
    assert r["fvd"] == pytest.approx(metrics.frechet_distance_features(real, fake))
    assert r["fvd_ci_low"] < r["fvd"] < r["fvd_ci_high"]
    assert metrics.fvd_from_features(real, fake, num_bootstrap=100, seed=0) == r  # seeded bootstrap


def test_wilson_interval_and_class_score():
    lo, hi = metrics.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook Wilson 95 % values
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    assert metrics.wilson_interval(0, 20)[0] == 0.0 and metrics.wilson_interval(20, 20)[1] == 1.0
    # confident and balanced over K = 4 classes -> 4; one class for everyone, or uniform -> 1
    assert metrics.class_score(np.eye(4)[np.arange(40) % 4]) == pytest.approx(4.0, rel=1e-6)
    assert metrics.class_score(np.tile([[1.0, 0, 0, 0]], (40, 1))) == pytest.approx(1.0)
    assert metrics.class_score(np.full((40, 4), 0.25)) == pytest.approx(1.0)
