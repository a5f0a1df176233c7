"""The TPQ activation quantizer (docs/method.md §3) and the per-channel weight quantizer."""

import copy

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


def test_observer_sample_is_uniform_over_chunks():
    """20 chunks, each labelled by its index: a uniform sample keeps about 1/20 from each, whatever
    the order (the old concat-and-subsample kept ~71% from the last chunk and none from chunks 1-9)."""
    from dq.quant.quantizers import MAX_OBSERVED_VALUES, _RangeObserver

    obs = _RangeObserver(num_groups=1, keep_values=True, generator_seed=3)
    chunk = MAX_OBSERVED_VALUES // 4
    for k in range(20):
        obs.update(0, torch.full((chunk,), float(k)))
    kept = obs.values[0]
    assert kept.numel() == MAX_OBSERVED_VALUES
    shares = torch.bincount(kept.long(), minlength=20).float() / kept.numel()
    # binomial sd of one share at K = 65536: sqrt(0.05 * 0.95 / K) ~ 0.00085; allow ~6 sd
    assert (shares - 0.05).abs().max() < 0.005, shares
    assert obs.seen[0] == 20 * chunk
    assert float(obs.lo[0]) == 0.0 and float(obs.hi[0]) == 19.0


def test_observer_uneven_chunks_and_exact_range():
    """Chunks of different sizes weigh by their size; the streaming min/max is exact even when the sample
    misses the extremes."""
    from dq.quant.quantizers import MAX_OBSERVED_VALUES, _RangeObserver

    obs = _RangeObserver(num_groups=2, keep_values=True, generator_seed=0)
    big, small = 3 * MAX_OBSERVED_VALUES, MAX_OBSERVED_VALUES // 2
    obs.update(1, torch.zeros(small))
    obs.update(1, torch.ones(big))
    obs.update(1, torch.tensor([-50.0, 70.0]))  # two extremes a 65,536-sample is unlikely to hold
    share_small = float((obs.values[1] == 0).float().mean())
    assert abs(share_small - small / (small + big + 2)) < 0.01
    assert float(obs.lo[1]) == -50.0 and float(obs.hi[1]) == 70.0
    assert obs.values[0] is None and obs.seen[0] == 0


def test_mse_init_searches_from_the_exact_range():
    """The MSE search shrinks the observer's exact [min, max], not the sample's: an outlier outside the
    sample still bounds the search."""
    from dq.quant import ops

    x = torch.linspace(-1, 1, 1000)
    lo, hi = ops.mse_search_range(x, bits=8, grid=10, bounds=(torch.tensor(-4.0), torch.tensor(4.0)))
    assert float(hi) <= 4.0 and float(hi) > 1.0 - 1e-6  # from the bound, α = 1 - i/10 multiples of 4
    assert abs(float(hi) / 4.0 * 10 - round(float(hi) / 4.0 * 10)) < 1e-5
    lo_s, hi_s = ops.mse_search_range(x, bits=8, grid=10)
    assert float(hi_s) <= 1.0


def test_activation_drop_passes_the_chosen_share_unquantized_and_is_reproducible():
    from dq.quant import activation_drop

    q = _calibrated()
    q.step = 3
    x = torch.linspace(-1.0, 2.0, 40_000).reshape(200, 200) * 4.0 + 0.013  # off the grid almost everywhere
    quantized = q(x)
    block = torch.nn.Sequential(q)
    with activation_drop(block, 0.25, torch.Generator().manual_seed(5)):
        dropped = q(x)
    with activation_drop(block, 0.25, torch.Generator().manual_seed(5)):
        again = q(x)
    assert torch.equal(dropped, again)  # the masks come from the generator
    kept_float = dropped == x
    assert torch.equal(dropped[~kept_float], quantized[~kept_float])  # the rest is quantized as usual
    assert abs(kept_float.float().mean().item() - 0.25) < 0.01
    assert q.drop_prob == 0.0 and torch.equal(q(x), quantized)  # outside the block nothing is dropped
    with pytest.raises(ValueError, match="drop probability"), activation_drop(block, 1.0):
        pass


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_fake_quant_forward_reads_no_value_on_the_host(kind):
    """No per-layer device sync: after the one-time calibration check of the first call, a student's forward
    (one step for the batch, or per-sample steps as in training) never turns a tensor into a Python number,
    and a copy on the meta device, where any read of a value raises (ATen's own included), runs it too."""
    from dq.quant import QuantConfig, set_step
    from dq.sampling import unet_forward
    from tests.arch.test_transformers import _example, tiny_dit
    from tests.conftest import no_host_reads
    from tests.export.conftest import calibrated_student
    from tests.quant.conftest import tiny_unet2d

    if kind == "unet":
        model, x, cond = tiny_unet2d(), torch.randn(2, 3, 8, 8), None
    else:
        model = tiny_dit()
        example = _example("dit", model, n=2)
        x, cond = example["x_t"], example["cond"]
    config = QuantConfig(weight_bits=4, act_bits=4, num_steps=3, num_groups=3)
    student = calibrated_student(model, config, {i: x * (1 + i) for i in range(3)}, [900, 500, 100], cond)
    t = torch.full((2,), 500)
    with torch.no_grad():
        set_step(student, 1)
        expected = unet_forward(student, x, t, cond)  # the first call checks the tables once
        with no_host_reads():
            assert torch.equal(unet_forward(student, x, t, cond), expected)
        set_step(student, torch.tensor([0, 2]))
        with no_host_reads():
            unet_forward(student, x, t, cond)
        meta = student.to("meta")
        set_step(meta, 1)
        out = unet_forward(meta, x.to("meta"), t.to("meta"), None if cond is None else cond.to("meta"))
    assert out.device.type == "meta" and out.shape == expected.shape


def _observe_rows(q, data: list[torch.Tensor], rows) -> None:
    q.start_observing(seed=0)
    for s, x in enumerate(data):
        q.step = s
        q(x[rows])


@pytest.mark.parametrize("kind", ["minmax", "mse", "token"])
def test_observations_of_two_processes_merged_set_the_tables_of_one(kind):
    """Under DDP each process observes its share of the rows (rows r % 2 == rank), then merge_observed (the
    gather of torch.distributed, here a stand-in) makes the tables those of one process observing them all:
    exactly the min/max ones, and the searched ones on the processes' samples together (the whole data here,
    below the sample cap)."""
    from dq.quant.quantizers import TokenActQuantizer

    def make():
        if kind == "token":
            return TokenActQuantizer(4, 3, 3)
        return TemporalActQuantizer(4, 3, 3, init_method=kind)

    torch.manual_seed(0)
    data = [torch.randn(20, 16) * (s + 1) + s for s in range(3)]
    def rows_sorted(t: torch.Tensor) -> torch.Tensor:  # a multiset of tokens (rows) or values, canonically ordered
        t = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
        for column in reversed(range(t.shape[1])):
            t = t[torch.sort(t[:, column], stable=True).indices]
        return t

    def observed(q):
        return q._tokens if kind == "token" else q._observer.values

    one = make()
    _observe_rows(one, data, slice(None))
    whole = [None if v is None else rows_sorted(v) for v in observed(one)]
    one.finish_observing()
    ranks = [make(), make()]
    for rank, q in enumerate(ranks):
        _observe_rows(q, data, slice(rank, None, 2))
    states = []
    for q in ranks:  # what each process would contribute to the gather (a copy, as the gather pickles it)
        q.merge_observed(lambda obj: (states.append(copy.deepcopy(obj)), [obj])[1], seed=0)
    for q in ranks:
        q.merge_observed(lambda obj: states, seed=0)
        if kind != "minmax":  # the search runs on the same values as one process's
            assert all(torch.equal(rows_sorted(v), w) for v, w in zip(observed(q), whole))
        q.finish_observing()
    for q in ranks:
        if kind == "minmax":
            assert torch.equal(q.scale, one.scale) and torch.equal(q.zero_point, one.zero_point)
        elif kind == "mse":
            torch.testing.assert_close(q.scale, one.scale, rtol=1e-5, atol=0)
    assert torch.equal(ranks[0].scale, ranks[1].scale)  # the same tables on every process
    alone = make()  # a process that kept its own share only would differ
    _observe_rows(alone, data, slice(0, None, 2))
    assert any(v.shape != w.shape for v, w in zip(observed(alone), whole) if v is not None) or kind == "minmax"
    alone.finish_observing()
    if kind != "token":  # (the token ratios' grid is coarse: half the tokens may pick the same ones)
        assert not torch.equal(alone.scale, one.scale)
