"""Inception Score from class probabilities, and SSIM."""

import pytest
import torch

from dq.metrics import inception_score, ssim
from dq.metrics.ssim import ssim_window


def test_confident_and_balanced_predictions_score_the_number_of_classes():
    probs = torch.eye(10).repeat(20, 1)  # 200 samples, each certain, every class equally often
    mean, std = inception_score(probs, splits=4)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_identical_predictions_score_one():
    probs = torch.full((50, 10), 0.1)
    assert inception_score(probs, splits=5)[0] == pytest.approx(1.0, abs=1e-9)
    collapsed = torch.zeros(50, 10)
    collapsed[:, 3] = 1.0  # mode collapse: every sample is the same digit
    assert inception_score(collapsed, splits=5)[0] == pytest.approx(1.0, abs=1e-9)


def test_inception_score_refuses_logits_and_bad_splits():
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(torch.randn(20, 10), splits=2)
    with pytest.raises(ValueError, match=r"splits must lie in \[1, N=20\]"):
        inception_score(torch.full((20, 10), 0.1), splits=21)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 16, 16, generator=generator) * 2 - 1
    assert ssim(images, images) == pytest.approx(1.0, abs=1e-6)
    noisy = [ssim((images + s * torch.randn(images.shape, generator=generator)).clamp(-1, 1), images)
             for s in (0.05, 0.2, 0.5)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]


def test_ssim_window_fits_small_images_and_shapes_must_match():
    assert ssim_window(16, 16) == 11 and ssim_window(8, 8) == 7 and ssim_window(10, 32) == 9
    images = torch.zeros(2, 1, 8, 8)
    assert ssim(images, images) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ssim(images, torch.zeros(2, 1, 8, 9))
