"""The PSNR figures of a student's samples against the FP model's: the PSNR of the mean MSE follows the mean
error, the mean of per-image PSNRs is pulled up by a few near-identical images."""

import math

import torch

from dq.metrics import fidelity_figures, median_psnr, mse, psnr, psnr_of_mse
from dq.metrics.figures import FIDELITY_KEYS


def _pair(n: int = 16, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(n, 1, 8, 8, generator=g) * 1.6 - 0.8
    return reference + noise * torch.randn(reference.shape, generator=g), reference


def test_psnr_of_mse_is_the_psnr_of_the_mean_error_and_the_median_the_middle_image():
    images, reference = _pair()
    assert math.isclose(psnr_of_mse(images, reference), 10 * math.log10(1 / mse(images, reference)), rel_tol=1e-12)
    per_image = [10 * math.log10(1 / float(((a - b) / 2).pow(2).mean())) for a, b in zip(images, reference)]
    assert math.isclose(psnr(images, reference), sum(per_image) / len(per_image), rel_tol=1e-5)
    assert math.isclose(median_psnr(images, reference), sorted(per_image)[(len(per_image) - 1) // 2], rel_tol=1e-5)
    # Jensen: the mean of logs is at least the log of the mean
    assert psnr(images, reference) >= psnr_of_mse(images, reference)


def test_one_near_identical_image_moves_the_mean_per_image_psnr_not_the_psnr_of_mse():
    images, reference = _pair()
    closer = images.clone()
    closer[0] = reference[0] + 1e-4 * (images[0] - reference[0])  # one image 80 dB closer to its reference
    mean_shift = psnr(closer, reference) - psnr(images, reference)
    mse_shift = psnr_of_mse(closer, reference) - psnr_of_mse(images, reference)
    assert mean_shift > 4.0  # 80 dB / 16 images
    assert 0 < mse_shift < 0.5
    assert abs(median_psnr(closer, reference) - median_psnr(images, reference)) < 0.5


def test_fidelity_figures_carry_every_key():
    images, reference = _pair()
    figures = fidelity_figures(images, reference)
    assert tuple(figures) == FIDELITY_KEYS
    assert figures["psnr_mse_vs_fp"] == psnr_of_mse(images, reference)
    assert 0 < figures["ssim_vs_fp"] < 1
