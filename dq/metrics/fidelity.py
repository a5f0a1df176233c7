"""Fidelity of a quantized student's samples to the FP teacher's samples from the same noise."""

from __future__ import annotations

import torch

from dq.errors import UserError


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise UserError(f"image batches must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of images [N, C, H, W] in [-1, 1] against reference, measured in [0, 1] units."""
    _check_pair(images, reference)
    return float(((images.float() - reference.float()) / 2).pow(2).mean())


def per_image_psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of each image [N, C, H, W] in [-1, 1] against its reference, peak 1 in [0, 1] units: [N]
    (inf for an identical pair)."""
    _check_pair(images, reference)
    per_image = ((images.float() - reference.float()) / 2).clamp(-1, 1).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / per_image)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean of the per-image PSNRs (dB). Sensitive to the few images that match their reference
    closely (a log of a small error): see psnr_of_mse for the figure that follows the mean error."""
    return float(per_image_psnr(images, reference).mean())


def psnr_of_mse(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR (dB) of the mean squared error over all images, 10·log10(1 / mse): a monotone function of mse,
    so it moves with the average error and not with a few near-identical images."""
    return float(10 * torch.log10(torch.tensor(1.0 / mse(images, reference), dtype=torch.float64)))


def median_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """The median of the per-image PSNRs (dB)."""
    return float(per_image_psnr(images, reference).median())
