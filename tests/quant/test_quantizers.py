"""The TPQ activation quantizer (METHOD.md §3) and the per-channel weight quantizer."""

import pytest
import torch

from dq.quant import TemporalActQuantizer, WeightQuantizer


def _calibrated(num_steps=6, num_groups=6, bits=4, method="minmax"):
    q = TemporalActQuantizer(bits, num_steps, num_groups, init_method=method)
    q.start_observing()
    for step in range(num_steps):  # step-dependent data: the range grows with the step index
        q.step = step
        q(torch.linspace(-1.0, 2.0, 512).reshape(64, 8)[torch.randperm(64)] * (step + 1))
    q.finish_observing()
    return q


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_per_step_tables_differ_after_initialisation(method):
    q = _calibrated(method=method)
    scales = q.scale.detach()
    assert len(set(scales.tolist())) == q.num_groups  # one distinct Δ per step
    assert (scales[1:] > scales[:-1]).all()  # growing ranges give growing steps
    assert bool(q.calibrated)


def test_calibration_with_per_sample_steps_matches_per_step():
    torch.manual_seed(0)
    data = [torch.randn(16, 8) * (s + 1) for s in range(4)]
    by_step = TemporalActQuantizer(8, 4, 4)
    by_step.start_observing()
    for s, x in enumerate(data):
        by_step.step = s
        by_step(x)
    by_step.finish_observing()
    mixed = TemporalActQuantizer(8, 4, 4)
    mixed.start_observing()
    mixed.step = torch.arange(4).repeat_interleave(16)
    mixed(torch.cat(data))
    mixed.finish_observing()
    torch.testing.assert_close(mixed.scale, by_step.scale)
    torch.testing.assert_close(mixed.zero_point, by_step.zero_point)


def test_gather_mode_equals_scalar_mode_per_sample():
    q = _calibrated(num_steps=8, num_groups=4)
    steps = torch.tensor([7, 0, 3, 3, 5])
    x = torch.randn(5, 3, 4, 4) * 5
    q.step = steps
    gathered = q(x)
    for i, s in enumerate(steps.tolist()):
        q.step = s
        torch.testing.assert_close(gathered[i : i + 1], q(x[i : i + 1]), rtol=0, atol=0)


def test_gather_gradients_reach_only_the_rows_in_the_batch():
    q = _calibrated(num_steps=6, num_groups=6)
    q.step = torch.tensor([1, 1, 4])
    x = torch.randn(3, 10) * 4
    q(x).pow(2).sum().backward()
    touched = (q.scale.grad != 0).nonzero().flatten().tolist()
    assert set(touched) <= {1, 4} and 4 in touched


def test_groups_without_data_borrow_the_nearest():
    q = TemporalActQuantizer(8, 6, 6)
    q.start_observing()
    for s in (0, 5):
        q.step = s
        q(torch.randn(32) * (s + 1))
    assert q.finish_observing() == [1, 2, 3, 4]
    assert q.scale[1] == q.scale[0] and q.scale[4] == q.scale[5]


def test_clear_errors():
    q = TemporalActQuantizer(4, 5, 5)
    with pytest.raises(RuntimeError, match="set_step"):
        q.start_observing()
        q(torch.randn(3))
    q._observer = None
    q.step = 0
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.randn(3))
    q.start_observing()
    with pytest.raises(RuntimeError, match="saw no data"):
        q.finish_observing()
    with pytest.raises(RuntimeError, match="without start_observing"):
        q.finish_observing()


def test_weight_quantizer_per_channel_init_and_gradients():
    w = torch.randn(6, 4, 3, 3)
    w[2] *= 10
    wq = WeightQuantizer(6, 4)
    wq.init_from(w)
    flat = w.reshape(6, -1)
    torch.testing.assert_close(wq.scale.detach(), (flat.amax(1) - flat.amin(1)) / 15, rtol=1e-5, atol=1e-7)
    weight = w.clone().requires_grad_(True)
    out = wq(weight)
    assert (out - w).abs().reshape(6, -1).amax(1).le(wq.scale.detach() / 2 + 1e-5).all()
    out.pow(2).sum().backward()
    assert weight.grad.abs().sum() > 0
    assert wq.scale.grad.abs().sum() > 0 and wq.zero_point.grad is not None
    wq.init_from(w, "mse")
    assert (wq.scale.detach() <= (flat.amax(1) - flat.amin(1)) / 15 + 1e-6).all()
    with pytest.raises(ValueError, match="init method"):
        wq.init_from(w, "kl")
