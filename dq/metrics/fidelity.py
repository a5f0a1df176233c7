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


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of images in [-1, 1] against reference, peak 1 in [0, 1] units;
    the per-image PSNRs are averaged (inf for identical batches)."""
    _check_pair(images, reference)
    per_image = ((images.float() - reference.float()) / 2).clamp(-1, 1).pow(2).flatten(1).mean(dim=1)
    return float((10 * torch.log10(1.0 / per_image)).mean())
