"""Each integer layer against its fake-quant twin: the same codes (the quantize step divides in the fake
quantizer's order), then an exact integer sum instead of a float32 one, so they agree to float rounding."""

import pytest
import torch
from torch import nn

from dq.export import int_twin
from dq.export.kernels import onednn_available
from dq.quant import QuantConfig, calibrate_activations, set_step
from dq.quant.layers import QuantConv2d, QuantLinear

BACKENDS = ["gemm"] + (["onednn"] if onednn_available() else [])
STEPS = 3


def _calibrated(layer, make_input):
    with calibrate_activations(layer), torch.no_grad():
        for step in range(STEPS):
            set_step(layer, step)
            layer(make_input(step))
    return layer


def _inputs(shape, seed):
    """Per-step inputs with outlier channels (where WD matters) and a different range per step (TPQ)."""
    g = torch.Generator().manual_seed(seed)

    def make(step):
        x = torch.randn(shape, generator=g) * (1 + step)
        x[:, :2] *= 6
        return x

    return make


def _assert_twin_matches(layer, make_input, backend):
    """Calibrate `layer` on per-step inputs, build its integer twin, and compare them at every step."""
    _calibrated(layer, make_input)
    twin = int_twin(layer, backend)
    for step in range(STEPS):
        x = make_input(step)
        set_step(layer, step)
        set_step(twin, step)
        with torch.no_grad():
            _close(twin(x), layer(x))


def _close(a, b):
    scale = b.abs().max()
    assert (a - b).abs().max() <= 2e-6 * scale, f"max diff {(a - b).abs().max():.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [(4, 4), (6, 6), (8, 8), (4, 8)])
@pytest.mark.parametrize("wd", [True, False])
@pytest.mark.parametrize("split_at", [None, 5])
def test_int_conv_equals_fake_quant_twin(backend, bits, wd, split_at):
    torch.manual_seed(0)
    config = QuantConfig(weight_bits=bits[0], act_bits=bits[1], num_steps=STEPS, num_groups=STEPS, weight_dilation=wd)
    layer = QuantConv2d.from_float(nn.Conv2d(12, 16, 3, padding=1), bits[0], bits[1], config, split_at)
    make = _inputs((2, 12, 7, 7), 1)
    _assert_twin_matches(layer, make, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [(4, 4), (6, 6), (8, 8)])
@pytest.mark.parametrize("wd", [True, False])
def test_int_linear_equals_fake_quant_twin(backend, bits, wd):
    torch.manual_seed(0)
    config = QuantConfig(weight_bits=bits[0], act_bits=bits[1], num_steps=STEPS, num_groups=STEPS, weight_dilation=wd)
    layer = QuantLinear.from_float(nn.Linear(20, 24), bits[0], bits[1], config)
    make = _inputs((3, 9, 20), 2)
    _assert_twin_matches(layer, make, backend)


def test_strided_unpadded_conv_and_one_step_per_call():
    config = QuantConfig(weight_bits=4, act_bits=4, num_steps=STEPS, num_groups=STEPS)
    layer = QuantConv2d.from_float(nn.Conv2d(4, 6, 3, stride=2), 4, 4, config)
    make = _inputs((2, 4, 9, 9), 3)
    _calibrated(layer, make)
    twin = int_twin(layer)
    x = make(1)
    set_step(layer, 1)
    set_step(twin, 1)
    with torch.no_grad():
        _close(twin(x), layer(x))
    set_step(twin, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one sampling step per call"):
        twin(x)
    set_step(twin, torch.tensor([2, 2]))  # per-sample indices of one group are fine
    set_step(layer, 2)
    with torch.no_grad():
        _close(twin(x), layer(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_forward_reads_no_value_on_the_host(backend, tmp_path):
    """The integer model finds its TPQ row on the device (it read it as a Python int in every layer: a
    device sync per layer per call): no Python number is built from a tensor in its forward, and with the
    gemm kernels (those of CUDA) it runs on the meta device, where any read of a value raises."""
    from dq.export import export_student, load_int_model
    from dq.quant import step_context
    from dq.sampling import unet_forward
    from tests.conftest import no_host_reads
    from tests.export.conftest import TINY_TIMESTEPS, tiny_student

    _, student = tiny_student()
    path = export_student(student, tmp_path / "tiny.safetensors", TINY_TIMESTEPS, "float32")
    model = load_int_model(path, backend=backend)
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), TINY_TIMESTEPS[1])
    with torch.no_grad(), step_context(model, 1):
        with no_host_reads():
            out = unet_forward(model, x, t)
        assert torch.isfinite(out).all()
        if backend == "gemm":
            meta = model.to("meta")
            assert unet_forward(meta, x.to("meta"), t.to("meta")).shape == out.shape
