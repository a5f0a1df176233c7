"""Weight Dilation invariants (docs/method.md §2): row ranges unchanged exactly, s >= 1, FP output unchanged."""

import pytest
import torch
import torch.nn.functional as F

from dq.quant import QuantConfig, apply_dilation, dilation_scale, ops
from dq.quant.layers import QuantLinear


def _weights(seed: int):
    """Random conv and linear weights with the awkward cases: outliers, zeros, all-zero channels, rows of
    one sign (where the ratio formula alone would move the row's min or max)."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(8, 6, 3, 3, generator=g)
    conv[:, 2] *= 25.0  # an outlier input channel
    conv[:, 4] = 0.0  # an all-zero input channel
    conv[1, :, 0, 0] = 0.0  # scattered zeros
    conv[3] = conv[3].abs() + 0.1  # an all-positive row
    conv[5] = -conv[5].abs() - 0.1  # an all-negative row
    linear = torch.randn(10, 12, generator=g) * torch.rand(12, generator=g) * 3
    linear[0] = linear[0].abs()
    linear[:, 7] = 0.0
    linear[2, 3] = 50.0  # one outlier element
    return [conv, linear, torch.randn(4, 3, 1, 1, generator=g), torch.randn(1, 5, generator=g)]


@pytest.mark.parametrize("seed", range(12))
def test_row_ranges_are_unchanged_exactly(seed):
    for w in _weights(seed):
        s = dilation_scale(w)
        assert s.shape == (w.shape[1],)
        dilated = apply_dilation(w, s).reshape(w.shape[0], -1)
        flat = w.reshape(w.shape[0], -1)
        assert torch.equal(dilated.amax(dim=1), flat.amax(dim=1))
        assert torch.equal(dilated.amin(dim=1), flat.amin(dim=1))
        assert (s >= 1).all()


def test_all_zero_channel_and_saturated_channels_get_one():
    w = _weights(0)[0]
    s = dilation_scale(w)
    assert s[4] == 1.0  # all-zero channel
    flat = w.reshape(8, 6, -1)
    for o in range(8):  # every channel that holds some row's max or min
        for k in range(6):
            if (flat[o, k] == flat[o].max()).any() or (flat[o, k] == flat[o].min()).any():
                assert s[k] == 1.0


def test_unsaturated_channels_are_enlarged():
    w = torch.tensor([[1.0, 0.5, -0.25, -1.0], [2.0, 0.5, 0.1, -2.0]])
    s = dilation_scale(w)
    # channel 1: min(1/0.5, 2/0.5) = 2; channel 2: min(-1/-0.25, 2/0.1) = 4
    assert s.tolist() == [1.0, 2.0, 4.0, 1.0]


def test_one_signed_rows_keep_their_extremes():
    # an all-positive row: channel 1 holds its (positive) min, the ratio formula would give 3/1 = 3
    w = torch.tensor([[3.0, 1.0, 2.0], [-1.0, 0.5, 1.0]])
    s = dilation_scale(w)
    assert s[1] == 1.0
    assert torch.equal(apply_dilation(w, s).amin(dim=1), w.amin(dim=1))


@pytest.mark.parametrize("seed", range(4))
def test_fp_layer_output_unchanged(seed):
    g = torch.Generator().manual_seed(seed)
    conv_w, lin_w = _weights(seed)[:2]
    x = torch.randn(2, 6, 9, 9, generator=g)
    s = dilation_scale(conv_w)
    y = F.conv2d(x, conv_w, padding=1)
    y_wd = F.conv2d(x / s.view(1, -1, 1, 1), apply_dilation(conv_w, s), padding=1)
    torch.testing.assert_close(y_wd, y, rtol=1e-5, atol=1e-4)
    xl = torch.randn(3, 12, generator=g)
    sl = dilation_scale(lin_w)
    torch.testing.assert_close(F.linear(xl / sl, apply_dilation(lin_w, sl)), F.linear(xl, lin_w), rtol=1e-5, atol=1e-4)


def test_max_scale_caps():
    w = torch.tensor([[1.0, 0.001, -1.0]])
    assert dilation_scale(w)[1] == pytest.approx(1000.0)
    assert dilation_scale(w, max_scale=8.0)[1] == 8.0
    with pytest.raises(ValueError, match="max_scale"):
        dilation_scale(w, max_scale=0.5)


def test_bad_weights_raise():
    with pytest.raises(ValueError, match="shape"):
        dilation_scale(torch.randn(5))
    with pytest.raises(ValueError, match="NaN"):
        dilation_scale(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="floating"):
        dilation_scale(torch.ones(2, 2, dtype=torch.int64))


def test_wd_lowers_activation_quantization_error_with_outliers_on_unsaturated_weights():
    """Input channel 0 carries large activations, but its weights are small (never a row's max/min):
    WD divides that channel by a large s, which shrinks the per-tensor activation range, so the layer's
    output error under 4-bit activation quantization drops (the weights themselves stay in float here)."""
    g = torch.Generator().manual_seed(0)
    in_f, out_f = 16, 8
    weight = torch.randn(out_f, in_f, generator=g)
    weight[:, 0] *= 0.02  # unsaturated: tiny weights on the outlier channel
    x = torch.randn(4096, in_f, generator=g)
    x[:, 0] *= 30.0  # the outlier activation channel
    calib, test = x[:2048], x[2048:]
    y_ref = F.linear(test, weight)
    errors = {}
    for wd in (False, True):
        layer = torch.nn.Linear(in_f, out_f, bias=False)
        layer.weight.data.copy_(weight)
        config = QuantConfig(weight_bits=8, act_bits=4, num_steps=1, num_groups=1, weight_dilation=wd)
        q = QuantLinear.from_float(layer, 8, 4, config)
        q.weight_quantizer.enabled = False  # isolate the activation quantization error
        q.act_quantizer.step = 0
        q.act_quantizer.start_observing()
        q(calib)
        q.act_quantizer.finish_observing()
        with torch.no_grad():
            errors[wd] = float((q(test) - y_ref).pow(2).mean())
    assert errors[True] < 0.25 * errors[False], errors


def test_wd_does_not_change_weight_quantization_step():
    w = _weights(3)[0]
    s = dilation_scale(w)
    flat, dil = w.reshape(8, -1), apply_dilation(w, s).reshape(8, -1)
    sc, _ = ops.qparams_from_range(flat.amin(1), flat.amax(1), 4)
    sc_wd, _ = ops.qparams_from_range(dil.amin(1), dil.amax(1), 4)
    assert torch.equal(sc, sc_wd)
