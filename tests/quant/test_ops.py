"""The pure quantization functions (docs/method.md §1), checked against PyTorch's own fake-quant kernels."""

import pytest
import torch

from dq.quant import ops


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_matches_torch_per_tensor(bits):
    x = torch.randn(1000) * 3
    scale, zp = ops.qparams_from_range(x.min(), x.max(), bits)
    ours = ops.fake_quantize(x, scale, zp, bits)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 2**bits - 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_fake_quantize_per_channel_matches_torch():
    w = torch.randn(6, 5, 3, 3)
    flat = w.reshape(6, -1)
    scale, zp = ops.qparams_from_range(flat.amin(1), flat.amax(1), 4)
    ours = ops.fake_quantize_per_channel(w, scale, zp, 4, axis=0)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, 0, 15)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_quantized_values_lie_on_the_grid_and_range_ends_are_kept():
    x = torch.linspace(-1.3, 2.1, 500)
    scale, zp = ops.qparams_from_range(x.min(), x.max(), 4)
    q = ops.fake_quantize(x, scale, zp, 4)
    codes = q / scale + zp
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert codes.unique().numel() <= 16
    assert abs(float(q.min()) - -1.3) <= float(scale) / 2 + 1e-6
    assert abs(float(q.max()) - 2.1) <= float(scale) / 2 + 1e-6
    # zero is exactly representable
    assert float(ops.fake_quantize(torch.zeros(1), scale, zp, 4)) == 0.0


def test_ste_gradients_reach_input_scale_and_zero_point():
    x = torch.tensor([-3.0, -0.4, 0.05, 0.3, 0.77, 5.0], requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    zp = torch.tensor(7.0, requires_grad=True)
    y = ops.fake_quantize(x, scale, zp, 4)  # grid [-0.7, 0.8]: -3.0 and 5.0 are clamped
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # LSQ: inside the grid d/dΔ = round(x/Δ) − x/Δ, clamped below −z, above qmax − z
    inside = x.detach()[1:5] / 0.1
    expected = float((inside.round() - inside).sum()) + (0 - 7) + (15 - 7)
    assert float(scale.grad) == pytest.approx(expected, abs=1e-4)
    # d/dz is 0 inside the grid and −Δ for each clamped element
    assert float(zp.grad) == pytest.approx(-0.1 * 2, abs=1e-6)


def test_round_ste_forward_and_backward():
    x = torch.tensor([0.2, 1.6, -2.5], requires_grad=True)
    y = ops.round_ste(x)
    assert y.tolist() == torch.round(x.detach()).tolist()
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


def test_gather_equals_per_sample_scalar_quantization():
    torch.manual_seed(0)
    groups, batch, heads = 5, 4, 3
    scales = torch.rand(groups) * 0.2 + 0.01
    zps = torch.randint(0, 16, (groups,)).float()
    rows = torch.tensor([4, 0, 2, 2])
    x = torch.randn(batch, 6, 7)
    gathered = ops.fake_quantize_per_sample(x, scales, zps, rows, 4)
    for b in range(batch):
        expected = ops.fake_quantize(x[b], scales[rows[b]], zps[rows[b]], 4)
        torch.testing.assert_close(gathered[b], expected, rtol=0, atol=0)
    # attention's (batch·heads, ...) layout repeats each sample's row over its heads
    xh = torch.randn(batch * heads, 5, 2)
    gathered = ops.fake_quantize_per_sample(xh, scales, zps, rows, 4)
    for i in range(batch * heads):
        r = rows[i // heads]
        torch.testing.assert_close(gathered[i], ops.fake_quantize(xh[i], scales[r], zps[r], 4), rtol=0, atol=0)


def test_gather_rejects_batch_that_is_not_a_multiple():
    with pytest.raises(ValueError, match="not a multiple"):
        ops.gather_per_sample(torch.ones(3), torch.tensor([0, 1]), torch.randn(3, 2))


def test_percentile_range_matches_quantile():
    x = torch.randn(10_000)
    lo, hi = ops.percentile_range(x, 99.0)
    assert float(hi) == pytest.approx(float(torch.quantile(x, 0.99)), abs=0.02)
    assert float(lo) == pytest.approx(float(torch.quantile(x, 0.01)), abs=0.02)
    with pytest.raises(ValueError, match="percentile"):
        ops.percentile_range(x, 30.0)


def test_mse_search_beats_minmax_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.randn(20_000)
    x[:10] *= 40  # a few outliers stretch the min-max range
    bits = 4
    s_mm, z_mm = ops.qparams_from_range(x.min(), x.max(), bits)
    lo, hi = ops.mse_search_range(x, bits)
    s_mse, z_mse = ops.qparams_from_range(lo, hi, bits)
    err_mm = (ops.fake_quantize(x, s_mm, z_mm, bits) - x).pow(2).mean()
    err_mse = (ops.fake_quantize(x, s_mse, z_mse, bits) - x).pow(2).mean()
    assert err_mse < 0.8 * err_mm  # α = 1 (min-max) is a candidate, so the search is never worse


def test_mse_search_per_channel_shapes():
    w = torch.randn(7, 3, 3, 3)
    lo, hi = ops.mse_search_range(w, 4, axis=0)
    assert lo.shape == hi.shape == (7,)
    assert (lo <= 0).all() and (hi >= 0).all()


def test_step_groups():
    torch.testing.assert_close(ops.step_groups(10, 10), torch.arange(10))
    g = ops.step_groups(10, 3)
    assert g.tolist() == sorted(g.tolist())  # contiguous
    assert set(g.tolist()) == {0, 1, 2}
    assert ops.step_groups(7, 1).tolist() == [0] * 7
    with pytest.raises(ValueError, match="num_groups"):
        ops.step_groups(5, 6)
    with pytest.raises(ValueError, match="num_steps"):
        ops.step_groups(0, 1)


@pytest.mark.parametrize("bits", [0, 17, 3.5])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        ops.qmax(bits)
