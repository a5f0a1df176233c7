"""Timestep-keyed TPQ: the row lookup of each policy, the hooks (explicit steps win, nothing left set), the
interpolated quantizer, the schedule in the saved state, and the integer model keyed alike."""

import copy

import pytest
import torch

from dq.arch import describe
from dq.export import export_student, load_int_model
from dq.export.layers import IntActQuantizer
from dq.quant import (
    StepBlend,
    TemporalActQuantizer,
    TimestepKeying,
    act_quantizers,
    key_by_timestep,
    load_quant_state,
    ops,
    save_quant_state,
    set_step,
    step_context,
    step_indexed,
    timestep_keying,
)
from dq.sampling import unet_forward
from tests.export.conftest import TINY_TIMESTEPS, tiny_student

SCHEDULE = [800, 600, 400, 200, 0]


def test_exact_finds_rows_and_refuses_other_timesteps_naming_them():
    keying = TimestepKeying(SCHEDULE)
    assert keying.resolve(torch.tensor(400)) == 2
    assert keying.resolve(torch.tensor([600, 600])) == 1  # one row for the batch
    assert keying.resolve(torch.tensor([800, 0, 200])).tolist() == [0, 4, 3]  # per sample
    assert keying.resolve(600.0) == 1 and keying.resolve(torch.tensor([600.00001])) == 1
    with pytest.raises(ValueError, match=r"timestep\(s\) 999, 500 are not in the schedule .* \[800, 600, 400, 200, 0\]"):
        keying.resolve(torch.tensor([999, 500, 400]))
    assert keying.unmatched(torch.tensor([999, 500, 400])) == [999, 500]
    keying.check_schedule(SCHEDULE)
    with pytest.raises(ValueError, match="tpq_policy='nearest' or 'interpolate'"):
        keying.check_schedule([700, 0])


def test_nearest_takes_the_nearest_trained_timestep_ties_to_the_earlier_step():
    keying = TimestepKeying(SCHEDULE, "nearest")
    assert keying.resolve(torch.tensor([999, 650, 500, 120, 80, -5])).tolist() == [0, 1, 1, 3, 4, 4]
    assert keying.resolve(torch.tensor(99)) == 4 and keying.resolve(torch.tensor(101)) == 3


def test_interpolate_blends_the_two_neighbouring_rows():
    keying = TimestepKeying(SCHEDULE, "interpolate")
    assert keying.resolve(torch.tensor(600)) == 1  # a trained timestep: its own row, no blend
    blend = keying.resolve(torch.tensor([650, 500, 999, 100, 200]))
    assert isinstance(blend, StepBlend)
    assert blend.start.tolist() == [0, 1, 0, 3, 3] and blend.end.tolist() == [1, 2, 0, 4, 3]
    assert torch.allclose(blend.weight, torch.tensor([0.75, 0.5, 0.0, 0.5, 0.0]))


def test_repeated_timesteps_key_to_their_first_step():
    keying = TimestepKeying([900, 500, 500, 0])  # PLMS repeats its second timestep
    assert keying.resolve(torch.tensor(500)) == 1 and keying.resolve(torch.tensor(0)) == 3


def test_bad_policy_and_schedule_are_refused():
    with pytest.raises(ValueError, match="tpq_policy must be one of"):
        TimestepKeying(SCHEDULE, "closest")
    with pytest.raises(ValueError, match="at least one timestep"):
        TimestepKeying([])
    _, student = tiny_student()
    with pytest.raises(ValueError, match="5 trained timesteps given for TPQ tables of \\[3\\] sampling steps"):
        key_by_timestep(student, SCHEDULE)
    with pytest.raises(ValueError, match="no TPQ tables"):
        key_by_timestep(torch.nn.Linear(2, 2), SCHEDULE)


def test_quantizer_with_a_blend_uses_interpolated_scale_and_rounded_zero_point():
    quantizer = TemporalActQuantizer(bits=4, num_steps=3, num_groups=3)
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([0.1, 0.3, 0.5]))
        quantizer.zero_point.copy_(torch.tensor([2.0, 7.0, 12.0]))
    quantizer.calibrated.fill_(True)
    x = torch.linspace(-2, 3, 2 * 40).reshape(2, 40)
    quantizer.step = StepBlend(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0.25, 0.5]))
    out = quantizer(x)
    # row 0: Δ = 0.15, z = round(3.25) = 3; row 1: Δ = 0.4, z = round(9.5) = 10 (round half to even)
    assert torch.equal(out[0], ops.fake_quantize(x[0], torch.tensor(0.15), torch.tensor(3.0), 4))
    assert torch.equal(out[1], ops.fake_quantize(x[1], torch.tensor(0.4), torch.tensor(9.5), 4))
    quantizer.step = StepBlend(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.0]))
    set_out = quantizer(x)
    quantizer.step = 0
    assert torch.equal(set_out, quantizer(x))  # weight 0 = the start row exactly
    quantizer.step = StepBlend(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]))
    with pytest.raises(RuntimeError, match="interpolated step .* has no single group"):
        quantizer.group_rows()


def test_hook_keys_calls_lets_explicit_steps_win_and_leaves_nothing_set():
    unet, student = tiny_student()
    key_by_timestep(student, TINY_TIMESTEPS)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with step_context(student, 1):
            explicit = unet_forward(student, x, torch.tensor([500, 500]))
            # an explicit step wins, even over a timestep the exact policy would refuse, and stays set
            unet_forward(student, x, torch.tensor([123, 123]))
            assert all(q.step == 1 for q in step_indexed(student))
        keyed = unet_forward(student, x, torch.tensor([500, 500]))
        assert torch.equal(keyed, explicit)
        assert all(q.step is None for q in step_indexed(student))
        mixed = unet_forward(student, x, torch.tensor([900, 100]))
        with step_context(student, 0):
            first = unet_forward(student, x, torch.tensor([900, 900]))
        with step_context(student, 2):
            last = unet_forward(student, x, torch.tensor([100, 100]))
        assert torch.allclose(mixed[0], first[0], atol=1e-6) and torch.allclose(mixed[1], last[1], atol=1e-6)
        with pytest.raises(ValueError, match="not in the schedule"):
            unet_forward(student, x, torch.tensor([700, 700]))
        assert all(q.step is None for q in step_indexed(student))  # cleared after the failed call too
        with pytest.raises(ValueError, match="called without one"):
            student(x)


def test_keying_survives_deepcopy_and_replaces_an_earlier_one():
    _, student = tiny_student()
    key_by_timestep(student, TINY_TIMESTEPS, "nearest")
    twin = copy.deepcopy(student)
    keying = timestep_keying(twin)
    assert keying is not None and keying is not timestep_keying(student)
    assert set(map(id, keying._quantizers)) == set(map(id, step_indexed(twin)))
    again = key_by_timestep(twin, TINY_TIMESTEPS, "interpolate")
    assert timestep_keying(twin) is again and len(twin._forward_pre_hooks) == 1


def test_saved_state_records_the_schedule_and_loading_keys_with_the_policy(tmp_path):
    unet, student = tiny_student()
    save_quant_state(student, tmp_path / "plain.safetensors")
    assert timestep_keying(load_quant_state(unet, tmp_path / "plain.safetensors", describe(unet))) is None
    key_by_timestep(student, TINY_TIMESTEPS)
    save_quant_state(student, tmp_path / "keyed.safetensors")
    loaded = load_quant_state(unet, tmp_path / "keyed.safetensors", describe(unet), tpq_policy="interpolate")
    keying = timestep_keying(loaded)
    assert keying.timestep_list() == TINY_TIMESTEPS and keying.policy == "interpolate"
    with pytest.raises(ValueError, match="4 timesteps given for TPQ tables of 3"):
        save_quant_state(student, tmp_path / "bad.safetensors", timesteps=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="tpq_policy must be one of"):
        load_quant_state(unet, tmp_path / "keyed.safetensors", describe(unet), tpq_policy="bogus")


def test_integer_model_is_keyed_by_its_export_timesteps(tmp_path):
    _, student = tiny_student(8, 8)
    path = export_student(student, tmp_path / "e.safetensors", TINY_TIMESTEPS)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = load_int_model(path)
    assert timestep_keying(model).timestep_list() == TINY_TIMESTEPS
    with torch.no_grad():
        with step_context(model, 1):
            explicit = unet_forward(model, x, torch.tensor([500]))
        assert torch.equal(unet_forward(model, x, torch.tensor([500])), explicit)
        with pytest.raises(ValueError, match="not in the schedule"):
            unet_forward(model, x, torch.tensor([700]))
        blended = load_int_model(path, tpq_policy="interpolate")
        out = unet_forward(blended, x, torch.tensor([700]))  # halfway between steps 0 and 1
        assert torch.isfinite(out).all()


def test_integer_quantizer_blend_interpolates_scale_and_rounds_the_zero_point():
    quantizer = IntActQuantizer(8, torch.tensor([0.1, 0.3]), torch.tensor([10, 21]), torch.tensor([0, 1]))
    quantizer.step = StepBlend(torch.tensor([0]), torch.tensor([1]), torch.tensor([0.5]))
    scale, zero_point, zero_point_float = quantizer.row_params()
    assert torch.isclose(scale, torch.tensor(0.2)) and int(zero_point) == 16 and float(zero_point_float) == 16.0
    quantizer.step = 1
    assert float(quantizer.row_params()[0]) == pytest.approx(0.3)


def test_calibration_and_explicit_steps_are_untouched_by_keying():
    _, student = tiny_student()
    key_by_timestep(student, TINY_TIMESTEPS)
    set_step(student, 2)
    assert all(q.step == 2 for q in act_quantizers(student))
    set_step(student, None)


def test_calls_are_keyed_in_the_units_the_pipeline_passes():
    # Flux: dq's grid t = round(1000 σ), the pipeline passes the unrounded σ itself
    sigmas = [1.0, 0.8823529, 0.7142857, 0.4545454]
    keying = TimestepKeying([1000, 882, 714, 455], call_timesteps=sigmas)
    assert keying.resolve(torch.tensor(sigmas)).tolist() == [0, 1, 2, 3]
    assert keying.resolve(torch.tensor(0.7142857, dtype=torch.bfloat16)) == 2  # a bf16 pipeline's rounding
    with pytest.raises(ValueError, match=r"timestep\(s\) 0\.714 are not .* \[1, 0\.882353, 0\.714286, 0\.454545\]"):
        keying.resolve(torch.tensor(0.714, dtype=torch.float64))  # 0.3 of a grid step off in σ units
    with pytest.raises(ValueError, match=r"timestep\(s\) 714 are not"):
        keying.resolve(torch.tensor(714))  # the grid's units are not the calls'
    keying.check_schedule([1000, 882, 714, 455])  # dq's own schedules stay on the grid
    assert keying.matches([1000, 882, 714, 455]) and keying.unmatched(torch.tensor([714, 700])) == [700]
    nearest = TimestepKeying([1000, 882, 714, 455], "nearest", call_timesteps=sigmas)
    assert nearest.resolve(torch.tensor([0.8, 0.5])).tolist() == [1, 3]
    with pytest.raises(ValueError, match="3 call timesteps given for a trained schedule of 4 steps"):
        TimestepKeying([1000, 882, 714, 455], call_timesteps=sigmas[:3])
    with pytest.raises(ValueError, match="must run in the order of the trained schedule"):
        TimestepKeying([1000, 882, 714, 455], call_timesteps=sigmas[::-1])
