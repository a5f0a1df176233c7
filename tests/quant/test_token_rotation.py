"""The transformer activation options: per-token dynamic Linear inputs with TPQ clip ratios, and the signed
block-Hadamard input rotation folded into the weights."""

import pytest
import torch
from torch import nn

from dq.errors import UserError
from dq.export import ExportError, export_student
from dq.quant import (
    QuantConfig,
    TemporalActQuantizer,
    TokenActQuantizer,
    calibrate_activations,
    load_quant_state,
    quantize_model,
    save_quant_state,
    set_quant_enabled,
    set_step,
    step_context,
)
from dq.quant.rotation import block_size, hadamard, random_signs, rotate

T = 3


class Layout:  # a plain stack: no first / last / modulation layers, no attention
    first_layers: tuple = ()
    last_layers: tuple = ()
    modulation_layers: tuple = ()
    skip_splits: dict = {}
    attention: tuple = ()
    quantize_attention = None


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 48))


def _tokens(seed: int = 1) -> torch.Tensor:
    x = torch.randn(3, 10, 48, generator=torch.Generator().manual_seed(seed))
    x[..., 5] += 12.0  # an outlier channel, as transformer activations have
    return x


def _calibrated(config: QuantConfig, x: torch.Tensor) -> nn.Module:
    student = quantize_model(_mlp(), config, Layout())
    with calibrate_activations(student), torch.no_grad():
        set_step(student, torch.arange(3) % T)
        student(x)
    return student


def test_rotation_is_orthogonal_and_keeps_the_layer():
    for size in (2, 8, 64):
        h = hadamard(size, dtype=torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(size, dtype=torch.float64))
    assert (block_size(96, 128), block_size(384, 128), block_size(384, 64), block_size(77, 128)) == (32, 128, 64, 1)
    x, w = torch.randn(5, 96, dtype=torch.float64), torch.randn(7, 96, dtype=torch.float64)
    signs = random_signs(96).double()
    assert set(signs.tolist()) == {-1.0, 1.0} and torch.equal(signs, random_signs(96).double())  # fixed per width
    torch.testing.assert_close(rotate(x, signs, 32) @ rotate(w, signs, 32).T, x @ w.T)
    with pytest.raises(UserError, match="power of two"):
        block_size(96, 48)


def test_the_signs_keep_a_shared_offset_from_becoming_an_outlier():
    x = torch.full((1, 64), 3.0) + 0.1 * torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    plain = rotate(x, torch.ones(64), 64)  # an unsigned Hadamard puts the offset's whole mass in one channel
    signed = rotate(x, random_signs(64), 64)
    assert plain.abs().max() > 20 and signed.abs().max() < plain.abs().max() / 2


@pytest.mark.parametrize("options", [{"rotation": True}, {"act_granularity": "token"},
                                     {"act_granularity": "token", "rotation": True}])
def test_options_keep_the_float_model_and_build_what_they_say(options):
    config = QuantConfig(num_steps=T, num_groups=T, rotation_block=16, **options)
    model = _mlp()
    student = quantize_model(model, config, Layout())
    x = _tokens()
    set_quant_enabled(student, weights=False, activations=False)
    with torch.no_grad(), step_context(student, 0):
        torch.testing.assert_close(student(x), model(x), rtol=1e-5, atol=1e-5)
    kinds = {type(m.act_quantizer) for m in (student[0], student[2])}
    assert kinds == ({TokenActQuantizer} if options.get("act_granularity") == "token" else {TemporalActQuantizer})
    blocks = [m.rotation_block for m in (student[0], student[2])]
    assert blocks == ([16, 16] if options.get("rotation") else [1, 1])


def test_token_grid_is_each_tokens_own_range_shrunk_by_its_groups_ratio():
    x = _tokens()
    student = _calibrated(QuantConfig(num_steps=T, num_groups=T, act_granularity="token"), x)
    quantizer = student[0].act_quantizer
    assert ((quantizer.scale >= 0.5) & (quantizer.scale <= 1.0)).all() and bool(quantizer.calibrated)
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([1.0, 0.8, 0.6]))
    for step in range(T):
        quantizer.step = step
        got = quantizer(x)
        lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
        scale = quantizer.scale[step] * (hi - lo) / 15
        zero = torch.round(-lo * 15 / (hi - lo))
        want = (torch.clamp(torch.round(x / scale) + zero, 0, 15) - zero) * scale
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert (got - x).abs().amax() <= (scale / 2 + 1e-6).amax() or step > 0  # ratio 1: nothing clipped
    quantizer.step = torch.tensor([2, 0, 1])  # one row per sample
    rows = quantizer(x)
    for i, step in enumerate([2, 0, 1]):
        quantizer.step = step
        torch.testing.assert_close(rows[i : i + 1], quantizer(x[i : i + 1]))


def test_per_token_beats_per_tensor_on_an_outlier_token_and_trains_its_ratio():
    x = _tokens()
    x[0, 0] *= 30  # one token far larger than the rest: a per-tensor grid gives the others few levels
    errors = {}
    for granularity in ("tensor", "token"):
        config = QuantConfig(num_steps=T, num_groups=T, act_granularity=granularity)
        student = _calibrated(config, x)
        quantizer = student[0].act_quantizer
        quantizer.step = 1
        inputs = x / student[0].wd_scale
        with torch.no_grad():
            errors[granularity] = float((quantizer(inputs) - inputs).pow(2).mean())
    assert errors["token"] < errors["tensor"] / 4
    quantizer.step = torch.tensor([0, 1, 1])
    quantizer(x).pow(2).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad[1] != 0 and quantizer.scale.grad[2] == 0
    assert not isinstance(quantizer.zero_point, nn.Parameter)  # the zero point is each token's, not learned


def test_calibration_copies_the_nearest_seen_group():
    student = quantize_model(_mlp(), QuantConfig(num_steps=T, num_groups=T, act_granularity="token"), Layout())
    x = _tokens()
    with calibrate_activations(student), torch.no_grad():
        set_step(student, 0)
        student(x * 0.2)
        set_step(student, 2)
        student(x)
    scale = student[0].act_quantizer.scale
    assert scale[1] in (scale[0], scale[2])


def test_saved_state_round_trip_and_per_token_qk_export_refusal(tmp_path):
    config = QuantConfig(num_steps=T, num_groups=T, act_granularity="token", rotation=True, rotation_block=16)
    x = _tokens()
    student = _calibrated(config, x)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
        set_step(student, 1)
        want = student(x)
    for include_weights in (True, False):
        save_quant_state(student, tmp_path / "s.safetensors", include_weights=include_weights)
        loaded = load_quant_state(_mlp(), tmp_path / "s.safetensors", Layout())
        with torch.no_grad():
            set_step(loaded, 1)
            got = loaded(x)
        if include_weights:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:  # the rotation is rebuilt from the float weights: the same rotated weights up to float rounding
            assert torch.equal(loaded[0].rotation_signs, student[0].rotation_signs)
    per_token_qk = quantize_model(_mlp(), QuantConfig(num_steps=T, num_groups=T, attn_granularity="token"), Layout())
    with pytest.raises(ExportError, match="quantizes the attention's q and k per tensor"):
        export_student(per_token_qk, tmp_path / "int.safetensors", timesteps=[900, 500, 100])


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="act_granularity"):
        QuantConfig(act_granularity="channel")
    with pytest.raises(UserError, match="attn_granularity"):
        QuantConfig(attn_granularity="head")
    with pytest.raises(UserError, match="rotation must be true or false"):
        QuantConfig(rotation="auto")
    for block in (0, 48, True):
        with pytest.raises(UserError, match="rotation_block"):
            QuantConfig(rotation_block=block)


@pytest.mark.parametrize("bits", [4, 8])
def test_the_integer_layer_computes_the_same_per_token_codes(bits):
    """A per-token, rotated QuantLinear and its integer twin: the same codes, so the same output up to the
    float order of the products (a wrong scale, zero point or rotation moves every element by a grid step)."""
    from dq.export.runtime import int_twin

    config = QuantConfig(weight_bits=bits, act_bits=bits, num_steps=T, num_groups=T, act_granularity="token",
                         rotation=True, rotation_block=16)
    x = _tokens()
    student = _calibrated(config, x)
    layer = student[0]
    twin = int_twin(layer)
    assert type(twin.act_quantizers[0]).__name__ == "IntTokenActQuantizer" and twin.rotation_block == 16
    with torch.no_grad():
        for step in range(T):
            layer.act_quantizer.step = twin.act_quantizers[0].step = step
            fake, integer = layer(x), twin(x)
            grid = layer.weight_quantizer.scale.max() * x.abs().max()  # one weight step times the largest input
            assert (integer - fake).abs().max() < 1e-3 * grid
            set_quant_enabled(student, weights=True, activations=False)
            unquantized = layer(x)
            set_quant_enabled(student, weights=True, activations=True)
            assert (fake - unquantized).abs().max() > 100 * (integer - fake).abs().max()
