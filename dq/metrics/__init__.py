"""Metrics: fidelity of a student to its FP teacher (and, with evaluate.py, FID and friends)."""

from dq.metrics.fidelity import mse, psnr

__all__ = ["mse", "psnr"]
