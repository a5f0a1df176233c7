"""8-bit weights on a centred grid (QuantConfig.weight_zero_point "centred"): z_w = 128, fixed, so the integer
kernels take q_w − z_w as int8 without a shift correction."""

import pytest
import torch

from dq.arch import describe
from dq.errors import UserError
from dq.quant import QuantConfig, quantize_model
from dq.quant.quantizers import WeightQuantizer
from tests.quant.conftest import tiny_unet2d


def test_centred_quantizer_fixes_z_and_covers_the_range():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=g) + torch.linspace(-2, 2, 6).view(-1, 1, 1, 1)  # off-centre rows
    quantizer = WeightQuantizer(6, 8, centred=True)
    quantizer.init_from(weight)
    assert not isinstance(quantizer.zero_point, torch.nn.Parameter) and torch.equal(quantizer.zero_point, torch.full((6,), 128.0))
    assert [name for name, _ in quantizer.named_parameters()] == ["scale"]
    fake = quantizer(weight)
    codes = torch.round(fake / quantizer.scale.view(-1, 1, 1, 1)) + 128
    assert codes.min() >= 0 and codes.max() <= 255
    assert (fake - weight).abs().max() <= quantizer.scale.max() / 2 + 1e-6  # nothing clipped: min-max covered
    weight.requires_grad_(True)
    quantizer(weight).sum().backward()
    assert quantizer.scale.grad is not None and weight.grad is not None


def test_only_8_bit_weights_are_centred_and_their_export_needs_no_shift(tmp_path):
    from dq.export import export_student, load_int_model
    from dq.quant import calibrate_activations, set_step
    from dq.sampling import unet_forward

    unet = tiny_unet2d(0)
    config = QuantConfig(weight_bits=4, act_bits=8, num_steps=1, num_groups=1, weight_zero_point="centred")
    student = quantize_model(unet, config, describe(unet))
    centred = {name: m.centred for name, m in student.named_modules() if isinstance(m, WeightQuantizer)}
    assert centred["conv_in.weight_quantizer"] and centred["conv_out.weight_quantizer"]  # 8-bit first/last layers
    assert not centred["down_blocks.0.resnets.0.conv1.weight_quantizer"]  # 4-bit: learned z_w
    x = torch.randn(2, 3, 8, 8)
    with calibrate_activations(student), torch.no_grad():
        set_step(student, 0)
        unet_forward(student, x, torch.full((2,), 500))
    model = load_int_model(export_student(student, tmp_path / "c.safetensors", [500]), backend="gemm")
    assert all(kernel.shift is None for kernel in model.conv_in.kernels + model.conv_out.kernels)
    set_step(model, 0)
    t = torch.full((2,), 500)
    with torch.no_grad():
        integer, fake, fp = unet_forward(model, x, t), unet_forward(student, x, t), unet_forward(unet, x, t)
    # a code flip from float rounding now and then (learned z_w: 1.5e-3 of the quantization error here, centred
    # 5e-4), far below the quantization error itself
    assert (integer - fake).pow(2).mean() < 1e-2 * (fake - fp).pow(2).mean()


def test_a_bad_weight_zero_point_is_refused():
    with pytest.raises(UserError, match="weight_zero_point must be"):
        QuantConfig(weight_zero_point="symmetric")
