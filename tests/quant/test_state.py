"""Saving and loading a student's quantization state: exact round trip, clear refusals."""

import json

import pytest
import torch
from safetensors.torch import save_file

from dq.arch import describe
from dq.quant import (
    QuantConfig,
    calibrate_activations,
    load_quant_state,
    quantize_model,
    read_quant_state,
    save_quant_state,
    set_step,
)

from .conftest import tiny_unet2d, tiny_unet2d_condition

T = 3


def _trained_student(model):
    student = quantize_model(model, QuantConfig(num_steps=T, num_groups=T), describe(model))
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([900, 500, 100])
    with calibrate_activations(student), torch.no_grad():
        set_step(student, torch.arange(3))
        student(x, t)
    with torch.no_grad():  # move every parameter off its initial value, as training would
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return student, x, t


@pytest.mark.parametrize("include_weights", [True, False])
def test_round_trip_is_exact(tmp_path, include_weights):
    model = tiny_unet2d()
    student, x, t = _trained_student(model)
    path = save_quant_state(student, tmp_path / "student.safetensors", include_weights=include_weights)
    fresh = tiny_unet2d()  # a fresh float model of the same architecture
    restored = load_quant_state(fresh, path, describe(fresh))
    state, restored_state = student.state_dict(), restored.state_dict()
    tensors, _, _ = read_quant_state(path)
    for key in tensors:
        assert torch.equal(state[key], restored_state[key]), key
    if include_weights:
        assert state.keys() == restored_state.keys()
        assert all(torch.equal(state[k], restored_state[k]) for k in state)
        set_step(student, 1)
        set_step(restored, 1)
        with torch.no_grad():
            assert torch.equal(student(x, t).sample, restored(x, t).sample)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind


def test_load_into_an_existing_student(tmp_path):
    student, _, _ = _trained_student(tiny_unet2d())
    path = save_quant_state(student, tmp_path / "s.safetensors")
    fresh = tiny_unet2d(seed=5)
    other = quantize_model(fresh, QuantConfig(num_steps=T, num_groups=T), describe(fresh))
    loaded = load_quant_state(other, path)
    assert loaded is other
    assert torch.equal(loaded.conv_in.act_quantizer.scale, student.conv_in.act_quantizer.scale)


def test_config_mismatch_is_refused(tmp_path):
    student, _, _ = _trained_student(tiny_unet2d())
    path = save_quant_state(student, tmp_path / "s.safetensors")
    fresh = tiny_unet2d()
    other = quantize_model(fresh, QuantConfig(weight_bits=8, num_steps=T, num_groups=T), describe(fresh))
    with pytest.raises(ValueError, match="weight_bits"):
        load_quant_state(other, path)


def test_architecture_mismatch_is_refused(tmp_path):
    student, _, _ = _trained_student(tiny_unet2d())
    path = save_quant_state(student, tmp_path / "s.safetensors")
    other = tiny_unet2d_condition()
    with pytest.raises(ValueError, match="does not fit this model"):
        load_quant_state(other, path, describe(other))
    with pytest.raises(ValueError, match="needs its architecture description"):  # a float model, no description
        load_quant_state(other, path)


def test_shape_mismatch_is_refused(tmp_path):
    student, _, _ = _trained_student(tiny_unet2d())
    path = save_quant_state(student, tmp_path / "s.safetensors", include_weights=False)
    tensors, config, _ = read_quant_state(path)
    key = next(k for k in tensors if k.endswith("act_quantizer.scale"))
    tensors[key] = torch.ones(T + 1)
    meta = {"format": "dq-quant-state", "format_version": "1", "quant_config": json.dumps(config.to_dict()),
            "includes_weights": "false"}
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    fresh = tiny_unet2d()
    with pytest.raises(ValueError, match="shape mismatch"):
        load_quant_state(fresh, tmp_path / "bad.safetensors", describe(fresh))


def test_bad_files_are_refused(tmp_path):
    student, _, _ = _trained_student(tiny_unet2d())
    path = save_quant_state(student, tmp_path / "s.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_quant_state(tiny_unet2d(), truncated)
    with pytest.raises(FileNotFoundError, match="no quantization state"):
        load_quant_state(tiny_unet2d(), tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, foreign)
    with pytest.raises(ValueError, match="not a dq quantization state"):
        load_quant_state(tiny_unet2d(), foreign)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.ones(2)}, future, metadata={"format": "dq-quant-state", "format_version": "99"})
    with pytest.raises(ValueError, match="version 99"):
        load_quant_state(tiny_unet2d(), future)
    with pytest.raises(ValueError, match="not a dq quantized model"):
        save_quant_state(tiny_unet2d(), tmp_path / "fp.safetensors")
