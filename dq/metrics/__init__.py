"""Metrics: fidelity of a student to its FP teacher (MSE, PSNR, SSIM) and the pure functions behind FID,
sFID and IS. The feature networks live in dq.metrics.backends, reference statistics in
dq.metrics.reference, the CLIP score in dq.metrics.clip_score (imported from there: they load models)."""

from dq.metrics.fidelity import median_psnr, mse, psnr, psnr_of_mse
from dq.metrics.figures import fidelity_figures
from dq.metrics.frechet import FeatureStats, frechet_distance
from dq.metrics.images import to_uint8
from dq.metrics.inception_score import inception_score
from dq.metrics.kernel import kernel_distance
from dq.metrics.ssim import ssim

__all__ = ["FeatureStats", "fidelity_figures", "frechet_distance", "inception_score", "kernel_distance", "median_psnr", "mse",
           "psnr", "psnr_of_mse", "ssim", "to_uint8"]
