"""The kernel distance (KID) used to compare a student's samples with its teacher's."""

import pytest
import torch

from dq.metrics import kernel_distance


def test_same_distribution_is_near_zero_and_shifted_is_positive():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same = kernel_distance(a, b)
    shifted = kernel_distance(a + 0.5, b)
    assert abs(same) < 0.02
    assert shifted > 10 * max(abs(same), 1e-3)
    assert kernel_distance(a + 1.0, b) > shifted  # grows with the shift


def test_matches_the_definition_on_a_small_case():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [2.0, 0.0]])

    def k(x, y):
        return (float(x @ y) / 2 + 1) ** 3

    n, m = len(a), len(b)
    within_a = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    within_b = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    assert kernel_distance(a, b) == pytest.approx(within_a + within_b - 2 * across)


@pytest.mark.parametrize("a,b", [(torch.zeros(1, 4), torch.zeros(5, 4)), (torch.zeros(5, 4), torch.zeros(5, 3)),
                                 (torch.zeros(5), torch.zeros(5))])
def test_bad_shapes_are_refused(a, b):
    with pytest.raises(ValueError):
        kernel_distance(a, b)


def test_standardize_makes_the_figure_scale_free():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    base = kernel_distance(a + 0.3, b, standardize=True)
    assert kernel_distance(100 * (a + 0.3), 100 * b, standardize=True) == pytest.approx(base, rel=1e-6)
    assert base > 0


def test_paired_sets_are_not_pulled_below_zero():
    """Student and teacher samples from the same noise are correlated pair by pair: the plain estimator
    goes negative for two equal distributions; the paired one (cross term without i = i) stays near 0."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(400, 8, generator=g)
    a, b = base + 0.1 * torch.randn(400, 8, generator=g), base + 0.1 * torch.randn(400, 8, generator=g)
    assert kernel_distance(a, b) < -0.02
    assert abs(kernel_distance(a, b, paired=True)) < 0.02
    assert kernel_distance(a + 0.5, b, paired=True) > 0.1
    with pytest.raises(ValueError, match="same size"):
        kernel_distance(a, b[:10], paired=True)
