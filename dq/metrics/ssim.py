"""Structural similarity (SSIM, Wang et al. 2004) of a student's samples to the FP teacher's."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from dq.errors import UserError
from dq.metrics.fidelity import _check_pair

SSIM_WINDOW = 11  # the Gaussian window of the SSIM paper (sigma 1.5), shrunk for images smaller than it


def ssim_window(height: int, width: int) -> int:
    """The window side used for images of this size: 11, or the largest odd size that fits."""
    side = min(SSIM_WINDOW, height, width)
    return side if side % 2 else side - 1


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of images [N, C, H, W] in [-1, 1] against reference, computed in [0, 1] units with a
    Gaussian window (sigma 1.5, side `ssim_window(H, W)`), K1 = 0.01, K2 = 0.03; 1.0 for identical batches."""
    _check_pair(images, reference)
    if images.ndim != 4 or min(images.shape[-2:]) < 3:
        raise UserError(f"SSIM needs images [N, C, H, W] with H, W >= 3, got shape {tuple(images.shape)}")
    window = ssim_window(*images.shape[-2:])
    value = structural_similarity_index_measure(
        (images.float().clamp(-1, 1) + 1) / 2, (reference.float().clamp(-1, 1) + 1) / 2,
        data_range=1.0, kernel_size=window, sigma=1.5 * window / SSIM_WINDOW,
    )
    return float(value)
