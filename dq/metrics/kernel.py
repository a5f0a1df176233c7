"""Kernel distance (KID): the unbiased squared MMD between two feature sets with the cubic polynomial
kernel k(a, b) = (a·b / d + 1)^3 (Bińkowski et al. 2018, "Demystifying MMD GANs"). Unlike FID it is
unbiased at small N, which is why the sweep uses it to compare a student's samples with its teacher's."""

from __future__ import annotations

import torch

from dq.errors import UserError

# what train.py's kid_vs_fp is (results.json fidelity_protocol.kid); reports show kid_vs_fp only from runs
# that record this text (runs before the paired estimator carry a figure biased below zero)
KID_PROTOCOL = ("unbiased MMD^2, kernel (a.b/d + 1)^3, on the feature network's FID features standardised by the "
                "FP samples' per-dimension mean and std; pairs from the same noise left out of the cross term")


def kernel_distance(features: torch.Tensor, reference: torch.Tensor, standardize: bool = False,
                    paired: bool = False) -> float:
    """Unbiased MMD² of features [N, D] against reference [M, D] (N, M >= 2) with k = (a·b/D + 1)^3; 0 in
    expectation when both come from one distribution (a single estimate may be slightly negative).

    The kernel assumes features of order one (Inception's pool features are). standardize=True first maps
    both sets by the reference's per-dimension mean and std, for feature networks whose activations are
    far larger (dq's digit classifier: norms near 90 in 64 dimensions, where the raw kernel's values reach
    1e7 and the estimate is all rounding).

    paired=True (N = M): row i of both sets is one pair drawn together (a student's and its teacher's
    sample from the same noise), so only i != j are independent; the cross term then leaves out the
    pairs i = i, which would otherwise pull the estimate below zero by their correlation."""
    if features.ndim != 2 or reference.ndim != 2 or features.shape[1] != reference.shape[1]:
        raise UserError(f"need feature matrices [N, D] and [M, D], got {tuple(features.shape)} and {tuple(reference.shape)}")
    n, m = features.shape[0], reference.shape[0]
    if n < 2 or m < 2:
        raise UserError(f"kernel distance needs at least 2 samples per set, got {n} and {m}")
    a, b = features.double(), reference.double()
    if standardize:
        mean, std = b.mean(dim=0), b.std(dim=0).clamp_min(1e-12)
        a, b = (a - mean) / std, (b - mean) / std
    dim = a.shape[1]

    def gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.T / dim + 1.0) ** 3

    if paired and n != m:
        raise UserError(f"paired feature sets must have the same size, got {n} and {m}")
    k_aa, k_bb, k_ab = gram(a, a), gram(b, b), gram(a, b)
    within_a = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    within_b = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    across = (k_ab.sum() - k_ab.diagonal().sum()) / (n * (n - 1)) if paired else k_ab.mean()
    return float(within_a + within_b - 2.0 * across)
