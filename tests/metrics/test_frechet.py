"""Fréchet distance: zero for a set against itself, growing with noise, equal to an independent scipy
computation, and the statistics' validation."""

import numpy as np
import pytest
import scipy.linalg
import torch

from dq.metrics import FeatureStats, frechet_distance


def scipy_frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (pytorch-fid's way), independent of torchmetrics."""
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def _features(n=400, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator) / d**0.5
    return torch.randn(n, d, generator=generator) @ mixing + 0.5


def test_a_set_against_itself_is_zero():
    features = _features()
    assert abs(frechet_distance(features, FeatureStats.from_features(features))) < 1e-8


def test_grows_with_added_noise():
    features = _features()
    reference = FeatureStats.from_features(features)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(features.shape, generator=generator)
    distances = [frechet_distance(features + scale * noise, reference) for scale in (0.0, 0.1, 0.3, 1.0)]
    assert distances[0] < 1e-8
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_matches_scipy_sqrtm():
    a, b = _features(seed=0), _features(n=300, seed=1) * 1.2
    assert frechet_distance(a, FeatureStats.from_features(b)) == pytest.approx(
        scipy_frechet(a.double().numpy(), b.double().numpy()), rel=1e-6)


def test_mean_shift_alone_gives_its_squared_norm():
    features = _features()
    shift = torch.full((features.shape[1],), 0.25)
    assert frechet_distance(features + shift, FeatureStats.from_features(features)) == pytest.approx(
        float(shift.pow(2).sum()), rel=1e-6)


def test_statistics_with_unknown_count_give_the_same_distance():
    a, b = _features(seed=0), _features(seed=1)
    stats = FeatureStats.from_features(b)
    unknown = FeatureStats(stats.mean, stats.cov, None)
    assert frechet_distance(a, unknown) == pytest.approx(frechet_distance(a, stats), rel=1e-9)


def test_bad_shapes_are_refused():
    stats = FeatureStats.from_features(_features(d=8))
    with pytest.raises(ValueError, match=r"features must be \[N, 8\]"):
        frechet_distance(_features(d=4), stats)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(_features(d=8)[:1], stats)
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStats.from_features(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"mean \[D\] and cov \[D, D\]"):
        FeatureStats(torch.zeros(3), torch.zeros(3, 2), 10)
