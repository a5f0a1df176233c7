"""The fidelity figures of a student's samples against the FP model's from the same noise, as train.py's
results.json and evaluate.py's metrics.json record them."""

from __future__ import annotations

import torch

from dq.metrics.fidelity import median_psnr, mse, psnr, psnr_of_mse
from dq.metrics.ssim import ssim

FIDELITY_KEYS = ("psnr_vs_fp", "psnr_median_vs_fp", "psnr_mse_vs_fp", "mse_vs_fp", "ssim_vs_fp")


def fidelity_figures(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Images [N, C, H, W] in [-1, 1] against the reference from the same noise, in [0, 1] units:
    psnr_vs_fp (the mean of per-image PSNRs: the headline, as published tables report it; on the embedded
    model it moves least with the thread count and the CPU), psnr_median_vs_fp, psnr_mse_vs_fp (the PSNR of
    the mean squared error: it follows the mean error, so the few images that went wrong), mse_vs_fp and
    ssim_vs_fp (docs/evaluation.md, "Which PSNR")."""
    return {"psnr_vs_fp": psnr(images, reference), "psnr_median_vs_fp": median_psnr(images, reference),
            "psnr_mse_vs_fp": psnr_of_mse(images, reference), "mse_vs_fp": mse(images, reference),
            "ssim_vs_fp": ssim(images, reference)}
