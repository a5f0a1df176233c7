"""Tests of dq.sampling: spacings, the denoising loop, the grid."""
