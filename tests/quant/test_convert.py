"""The converter on tiny diffusers UNets: fidelity at W8A8, WD equivalence, split points, step plumbing,
and a clear error for every bad input."""

import pytest
import torch
from torch import nn

from dq.arch import Architecture, describe
from dq.quant import (
    QuantAttnProcessor,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    act_quantizers,
    calibrate_activations,
    quant_config,
    quantize_model,
    set_quant_enabled,
    set_step,
    step_context,
    tpq_num_steps,
)

from .conftest import tiny_unet2d, tiny_unet2d_condition

T = 4


def _inputs(model, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.linspace(900, 50, batch).long()
    kwargs = {}
    if hasattr(cfg, "cross_attention_dim") and cfg.cross_attention_dim:
        kwargs["encoder_hidden_states"] = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    return x, t, kwargs


def _calibrate(student, x, t, kwargs):
    with calibrate_activations(student), torch.no_grad():
        set_step(student, torch.arange(x.shape[0]) % T)
        student(x, t, **kwargs)


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("build", [tiny_unet2d, tiny_unet2d_condition])
def test_w8a8_student_stays_close_to_fp(build):
    model = build()
    x, t, kw = _inputs(model)
    student = quantize_model(model, QuantConfig(weight_bits=8, act_bits=8, num_steps=T, num_groups=T), describe(model))
    _calibrate(student, x, t, kw)
    set_step(student, torch.arange(4) % T)
    with torch.no_grad():
        ref, out = model(x, t, **kw).sample, student(x, t, **kw).sample
    assert _rel_err(out, ref) < 0.05
    # W4A4 is much further away: the test above really exercises quantization
    student4 = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, num_steps=T, num_groups=T), describe(model))
    _calibrate(student4, x, t, kw)
    set_step(student4, torch.arange(4) % T)
    with torch.no_grad():
        assert _rel_err(student4(x, t, **kw).sample, ref) > 2 * _rel_err(out, ref)


@pytest.mark.parametrize("build", [tiny_unet2d, tiny_unet2d_condition])
def test_every_layer_is_converted_with_the_policy(build):
    model = build()
    student = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, num_steps=T, num_groups=T), describe(model))
    float_layers = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name in float_layers:
        layer = student.get_submodule(name)
        assert isinstance(layer, (QuantConv2d, QuantLinear)), name
        expected = 8 if name in ("conv_in", "conv_out") else 4
        assert layer.weight_quantizer.bits == expected and layer.act_quantizer.bits == expected, name
    assert student.time_embedding.linear_1.weight_quantizer.bits == 4  # time embedding is quantized too
    processors = [m.processor for m in student.modules() if type(m).__name__ == "Attention"]
    assert processors and all(isinstance(p, QuantAttnProcessor) for p in processors)
    assert all(p.probs_quantizer.bits == 8 and p.q_quantizer.bits == 4 for p in processors)
    # the float model is untouched (copy by default)
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules())


def test_include_exclude_and_first_last_bits():
    model = tiny_unet2d()
    config = QuantConfig(first_layer_bits=None, last_layer_bits=6, exclude=("time_embedding.*",), num_steps=T, num_groups=T)
    student = quantize_model(model, config, describe(model))
    assert student.conv_in.weight_quantizer.bits == 4
    assert student.conv_out.weight_quantizer.bits == 6
    assert type(student.time_embedding.linear_1) is nn.Linear
    only_down = quantize_model(model, QuantConfig(include=("down_blocks.*",), quantize_attention=False, num_steps=T, num_groups=T), describe(model))
    assert type(only_down.conv_in) is nn.Conv2d and isinstance(only_down.down_blocks[0].resnets[0].conv1, QuantConv2d)
    assert not any(isinstance(m, QuantAttnProcessor) for m in only_down.modules())


@pytest.mark.parametrize("build", [tiny_unet2d, tiny_unet2d_condition])
def test_wd_keeps_the_float_function(build):
    """With fake quantization switched off, the dilated student computes the float model's function."""
    model = build()
    x, t, kw = _inputs(model)
    student = quantize_model(model, QuantConfig(num_steps=T, num_groups=T), describe(model))
    dilated = [m for m in student.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert any((m.wd_scale > 1).any() for m in dilated)  # WD really rescaled something
    set_quant_enabled(student, weights=False, activations=False)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, **kw).sample, model(x, t, **kw).sample, rtol=1e-4, atol=1e-4)
    no_wd = quantize_model(model, QuantConfig(weight_dilation=False, num_steps=T, num_groups=T), describe(model))
    assert all((m.wd_scale == 1).all() for m in no_wd.modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    torch.testing.assert_close(no_wd.conv_in.weight, model.conv_in.weight, rtol=0, atol=0)


def test_skip_splits_match_the_concatenation():
    model = tiny_unet2d()
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen[name] = args[0].shape[1]

        return hook

    for i, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(block.resnets):
            resnet.register_forward_pre_hook(record(f"up_blocks.{i}.resnets.{j}"), with_kwargs=True)
    x, t, _ = _inputs(model, batch=1)
    model(x, t)
    splits = describe(model).skip_splits
    assert {name.rsplit(".", 1)[0] for name in splits} == set(seen)
    for name, split in splits.items():
        assert 0 < split < seen[name.rsplit(".", 1)[0]]  # h first, then the skip: both halves non-empty
    student = quantize_model(model, QuantConfig(num_steps=T, num_groups=T), describe(model))
    conv1 = student.up_blocks[0].resnets[0].conv1
    assert conv1.split_at == splits["up_blocks.0.resnets.0.conv1"] and conv1.skip_act_quantizer is not None
    unsplit = quantize_model(model, QuantConfig(split_skip=False, num_steps=T, num_groups=T), describe(model))
    assert unsplit.up_blocks[0].resnets[0].conv1.skip_act_quantizer is None


def test_step_plumbing_and_scalar_sampling():
    model = tiny_unet2d()
    x, t, _ = _inputs(model)
    student = quantize_model(model, QuantConfig(weight_bits=8, act_bits=8, num_steps=T, num_groups=T), describe(model))
    _calibrate(student, x, t, {})
    assert tpq_num_steps(student) == T and tpq_num_steps(model) is None
    with step_context(student, 2):
        assert all(q.step == 2 for q in act_quantizers(student))
        student(x, t)
    assert all(q.step is None for q in act_quantizers(student))
    with pytest.raises(RuntimeError, match="set_step"):
        student(x, t)
    set_step(model, 3)  # a float model: no-op


def test_bad_inputs_get_clear_errors():
    model = tiny_unet2d()
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_model("unet", QuantConfig(), describe(model))
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_model(model, {"weight_bits": 4}, describe(model))
    student = quantize_model(model, QuantConfig(num_steps=T, num_groups=T), describe(model))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(student, QuantConfig(num_steps=T, num_groups=T), describe(student))
    with pytest.raises(ValueError, match="no Conv2d/Linear layer matches"):
        quantize_model(model, QuantConfig(include=("nothing.*",), num_steps=T, num_groups=T), describe(model))
    with pytest.raises(ValueError, match="out of range"):
        set_step(student, T)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        set_step(student, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="int64"):
        set_step(student, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="step must be"):
        set_step(student, "3")
    set_step(student, 0)
    x, t, _ = _inputs(model)
    with pytest.raises(RuntimeError, match="before calibration"):
        student(x, t)
    with pytest.raises(ValueError, match="not a dq quantized model"):
        quant_config(model)
    with pytest.raises(ValueError, match="no activation quantizers"), calibrate_activations(model):
        pass


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("weight_bits", 1, "weight_bits"),
        ("act_bits", 33, "act_bits"),
        ("first_layer_bits", 4.0, "first_layer_bits"),
        ("num_groups", 0, "num_groups"),
        ("num_groups", 30, "num_groups"),
        ("num_steps", 0, "num_steps"),
        ("dilation_max_scale", 0.5, "dilation_max_scale"),
        ("act_init", "kl", "act_init"),
        ("weight_init", "percentile", "weight_init"),
        ("act_percentile", 120.0, "act_percentile"),
        ("include", (), "include"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**{field: value})


def test_config_round_trip_and_unknown_keys():
    config = QuantConfig(weight_bits=6, act_bits=6, exclude=("conv_out",))
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown QuantConfig field"):
        QuantConfig.from_dict({"weight_bit": 4})


def test_inplace_conversion_keeps_parameter_objects():
    model = tiny_unet2d()
    bias = model.conv_in.bias
    student = quantize_model(model, QuantConfig(num_steps=T, num_groups=T), describe(model), inplace=True)
    assert student is model and student.conv_in.bias is bias


def test_the_description_passed_in_decides_the_policy():
    """The converter knows nothing of UNets itself: a layers-only description gives conv_in the common bits,
    splits no skip input and quantizes no attention."""
    model = tiny_unet2d()
    student = quantize_model(model, QuantConfig(num_steps=T, num_groups=T), Architecture("generic"))
    assert student.conv_in.weight_quantizer.bits == 4
    assert all(m.split_at is None for m in student.modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    assert not any(isinstance(m, QuantAttnProcessor) for m in student.modules())


class _ProjectionLinear(nn.Linear):
    """A subclass that computes as nn.Linear (torch's own NonDynamicallyQuantizableLinear is one)."""


class _LoRAConv(nn.Conv2d):
    """A LoRA-style layer: its own forward adds a low-rank branch a quantized Conv2d would drop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora_down = nn.Conv2d(self.in_channels, 1, 1, bias=False)
        self.lora_up = nn.Conv2d(1, self.out_channels, 1, bias=False)

    def forward(self, x):
        return super().forward(x) + self.lora_up(self.lora_down(x))


def test_layer_subclasses_are_quantized_or_refused_by_name():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), _ProjectionLinear(4 * 4 * 4, 8),
                          nn.modules.linear.NonDynamicallyQuantizableLinear(8, 3)).eval()
    config = QuantConfig(weight_bits=8, act_bits=8, num_steps=1, num_groups=1)
    student = quantize_model(model, config, arch=describe(model))
    assert [type(m).__name__ for m in student] == ["QuantConv2d", "Flatten", "QuantLinear", "QuantLinear"]
    set_quant_enabled(student, weights=False, activations=False)
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad(), step_context(student, 0):
        torch.testing.assert_close(student(x), model(x), rtol=1e-4, atol=1e-4)

    lora = nn.Sequential(nn.Conv2d(2, 2, 1), _LoRAConv(2, 4, 3, padding=1)).eval()
    with pytest.raises(ValueError, match=r"^1 layer\(s\) subclass nn.Conv2d / nn.Linear with a computation of their "
                                         r"own, which a quantized layer would not run: 1 \(_LoRAConv\); .*quant.exclude"):
        quantize_model(lora, config, arch=describe(lora))
    kept = quantize_model(lora, QuantConfig(exclude=("1", "1.*"), num_steps=1, num_groups=1), arch=describe(lora))
    assert type(kept[0]).__name__ == "QuantConv2d" and type(kept[1]) is _LoRAConv  # excluded: stays in float
