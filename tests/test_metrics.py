"""pyoco.metrics: Fréchet distance against scipy's sqrtm, temporal consistency, the TorchScript extractor."""

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


_EXTRACTOR_SRC = '''
import torch


class StyleGanVLike(torch.nn.Module):
    """Mimics the StyleGAN-V I3D export's signature; features only when return_features is set."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if not return_features:
            return torch.zeros(x.shape[0], 400)
        pooled = x.mean(dim=(2, 3, 4))
        return torch.cat([pooled, x.std(dim=(2, 3, 4))], dim=1)


class Plain(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(3, 4))  # (N, 3, T): flattened to (N, 3T)


torch.jit.script(StyleGanVLike()).save(OUT + "/stylegan_v_like.pt")
torch.jit.script(Plain()).save(OUT + "/plain.pt")
'''


@pytest.fixture(scope="module")
def extractors(tmp_path_factory):
    d = tmp_path_factory.mktemp("extractors")
    src = d / "make.py"
    src.write_text(f"OUT = {str(d)!r}\n" + _EXTRACTOR_SRC)  # TorchScript needs the source in a real file
    import runpy

    runpy.run_path(str(src), run_name="pyoco_test_extractors")
    return d


def test_torchscript_extractor_contract(extractors):
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, size=(5, 4, 8, 8, 3), dtype=np.uint8)
    x = metrics.videos_to_extractor_input(videos)
    assert x.shape == (5, 3, 4, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0

    sg = metrics.load_feature_extractor(extractors / "stylegan_v_like.pt", batch_size=2)
    feats = sg(videos)
    assert feats.shape == (5, 6)  # features, not the 400 logits: return_features=True was passed
    torch.testing.assert_close(torch.from_numpy(feats[:, :3]), x.mean(dim=(2, 3, 4)).double())

    plain = metrics.load_feature_extractor(extractors / "plain.pt")
    assert plain(videos).shape == (5, 12)
    fvd_same = metrics.frechet_video_distance(plain, videos, videos)
    assert fvd_same == pytest.approx(0.0, abs=1e-8)
    other = rng.integers(0, 64, size=(6, 4, 8, 8, 3), dtype=np.uint8)
    assert metrics.frechet_video_distance(plain, videos, other) > 0.1


def test_extractor_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        metrics.load_feature_extractor(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        metrics.load_feature_extractor(bad)
