"""Fréchet distance between Gaussian fits of features: FID, sFID and the digits' domain FID alike.

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))        (Heusel et al. 2017)

A feature set's Gaussian is its mean and unbiased covariance in float64 (`FeatureStats`). The distance
itself is torchmetrics' FrechetInceptionDistance, fed with features this project extracts, so every
backend shares one widely used implementation of the formula (the clean-fid backend uses clean-fid's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from dq.errors import UserError


@dataclass(frozen=True)
class FeatureStats:
    """mean float64 [D], cov float64 [D, D] (unbiased), count: the number of feature vectors (None when
    the statistics came from a file that does not say)."""

    mean: torch.Tensor
    cov: torch.Tensor
    count: int | None

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.cov.shape != (len(self.mean), len(self.mean)):
            raise UserError(f"FeatureStats needs mean [D] and cov [D, D], got {tuple(self.mean.shape)} and "
                             f"{tuple(self.cov.shape)}")
        if self.count is not None and self.count < 2:
            raise UserError(f"FeatureStats needs at least 2 feature vectors, got {self.count}")

    @property
    def dim(self) -> int:
        return len(self.mean)

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStats:
        """Statistics of features [N, D], N >= 2."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise UserError(f"features must be [N, D] with N >= 2, got shape {tuple(features.shape)}")
        features = features.double()
        return cls(features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], -1), features.shape[0])


class _GivenFeatures(nn.Module):
    """The "feature network" handed to torchmetrics: features arrive already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(features: torch.Tensor, reference: FeatureStats) -> float:
    """Fréchet distance between the Gaussian of features [N, D] (N >= 2) and reference statistics."""
    if features.ndim != 2 or features.shape[1] != reference.dim:
        raise UserError(f"features must be [N, {reference.dim}] to match the reference, got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise UserError(f"the Fréchet distance needs at least 2 feature vectors, got {features.shape[0]}")
    # sync_on_compute=False: only the calling process computes, even inside a DDP job
    metric = FrechetInceptionDistance(feature=_GivenFeatures(reference.dim), reset_real_features=False,
                                      sync_on_compute=False)
    # torchmetrics keeps sums; any n >= 2 reproduces mean and cov exactly, so an unknown count uses 2
    n = reference.count or 2
    mean = reference.mean.double()
    metric.real_features_sum = mean * n
    metric.real_features_cov_sum = reference.cov.double() * (n - 1) + n * torch.outer(mean, mean)
    metric.real_features_num_samples = torch.tensor(n)
    metric.update(features.double(), real=False)
    return float(metric.compute())
