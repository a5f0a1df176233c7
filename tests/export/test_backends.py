"""The backend registry and the GPU backends' kernels, run on the CPU: the Triton implicit-GEMM kernel in
Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) and FP8 products through the CPU's
`torch._scaled_mm`, each against the int64 reference bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from dq.errors import UserError
from dq.export import backends, load_int_model
from dq.export.kernels import onednn_available, shift_to_int8
from dq.export.layers import IntActQuantizer, IntConv2d, IntLinear
from dq.export.triton_kernels import interpreting, triton_importable
from dq.quant import set_step
from tests.export.test_kernels import _weights

needs_triton = pytest.mark.skipif(not (triton_importable() and interpreting()),
                                  reason="needs triton, imported with TRITON_INTERPRET=1 (requirements-dev.txt)")
CPU = torch.device("cpu")


def _float_input(shape, scale, zero, bits, seed, wd=None, axis=1):
    """Float activations whose codes cover the whole grid, with exact ties (x/Δx = n + 0.5) among them."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g) * (2**bits + 4) - zero - 2) * scale
    ties = torch.rand(shape, generator=g) < 0.2
    x = torch.where(ties, (torch.randint(-zero - 1, 2**bits - zero, shape, generator=g) + 0.5) * scale, x)
    if wd is not None:
        x = x * wd.view([-1 if i == axis % len(shape) else 1 for i in range(len(shape))])
    return x


def _reference_codes(x, wd, scale, zero, bits, axis=1):
    """The float quantizer's codes (IntActQuantizer.codes' arithmetic) minus z, as int64."""
    if wd is not None:
        x = x / wd.view([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)])
    return (x / scale).round().add(zero).clamp(0, 2**bits - 1).long() - zero.long()


def _conv_kernel(name, w, geometry, act_bits):
    w8, shift = shift_to_int8(w)
    stride, padding, dilation = geometry
    needs = backends.LayerNeeds(2**act_bits - 1, int(w.abs().max()), w[0].numel(), False)
    return backends.conv_kernel((name,), needs, w8, shift, torch.rand(w.shape[0]) + 0.5, stride, padding,
                                dilation, act_bits)


@needs_triton
@pytest.mark.parametrize("weight_bits,act_bits", [(4, 4), (8, 8), (4, 8)])
@pytest.mark.parametrize("geometry,kernel", [(((1, 1), (1, 1), (1, 1)), 3), (((2, 1), (0, 2), (1, 2)), 3),
                                             (((1, 1), (0, 0), (1, 1)), 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_conv_sums_are_exact(weight_bits, act_bits, geometry, kernel, channels_last):
    w = _weights((19, 13, kernel, kernel), weight_bits, 1)  # 8-bit rows carry a shift: added in the kernel
    op = _conv_kernel("triton", w, geometry, act_bits)
    assert op.backend == "triton" and op.takes_float
    scale, zero = torch.tensor(0.37), torch.tensor(float(2 ** (act_bits - 1) - 3))
    wd = torch.rand(13, generator=torch.Generator().manual_seed(2)) + 0.5
    x = _float_input((3, 13, 9, 7), 0.37, int(zero), act_bits, 3, wd)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    sums = op.rows(x, wd, scale, zero, 2**act_bits - 1, None, int_out=True)
    stride, padding, dilation = geometry
    reference = F.conv2d(_reference_codes(x, wd, scale, zero, act_bits).double(), w.double(), None, stride, padding,
                         dilation)
    assert sums.dtype == torch.int32
    assert torch.equal(sums.view(3, *reference.shape[2:], 19).permute(0, 3, 1, 2).long(), reference.long())


@needs_triton
@pytest.mark.parametrize("act_bits", [4, 8])
def test_triton_linear_sums_are_exact_and_its_output_is_the_gemm_backends(act_bits):
    w = _weights((21, 45), 8, 4)
    w8, shift = shift_to_int8(w)
    needs = backends.LayerNeeds(2**act_bits - 1, int(w.abs().max()), 45, False)
    weight_scale, bias = torch.rand(21) + 0.5, torch.randn(21)
    triton_op = backends.linear_kernel(("triton",), needs, w8, shift, weight_scale, act_bits)
    gemm_op = backends.linear_kernel(("gemm",), needs, w8, shift, weight_scale, act_bits)
    scale, zero = torch.tensor(0.05), torch.tensor(5.0)
    x = _float_input((2, 17, 45), 0.05, 5, act_bits, 5, axis=-1)
    centred = _reference_codes(x, None, scale, zero, act_bits, axis=-1)
    sums = triton_op.rows(x, None, scale, zero, 2**act_bits - 1, None, int_out=True)
    assert torch.equal(sums.long(), centred.reshape(-1, 45) @ w.long().t())
    out = triton_op(x, None, scale, zero, 2**act_bits - 1, bias)
    codes = (centred + 5).to(torch.uint8)
    expected = gemm_op(codes, scale, zero.to(torch.int32), bias)
    assert out.shape == (2, 17, 21)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-4)  # the 8-bit shift: int32 here, float there


@pytest.mark.parametrize("act_bits,zero", [(4, 0), (4, 15), (3, 4)])
def test_fp8_sums_are_exact(act_bits, zero):
    """With unit scales and no bias the float output is the integer sum itself, so equality is exactness."""
    w = _weights((20, 24, 3, 3), 4, 6)  # |q_w − z_w| ≤ 15: exact in e4m3
    op = backends.conv_kernel(("fp8",), backends.LayerNeeds(15, 15, 216, False), *shift_to_int8(w), torch.ones(20),
                              (1, 1), (1, 1), (1, 1), act_bits)
    assert op.backend == "fp8" and not op.takes_float
    codes = torch.randint(0, 2**act_bits, (2, 24, 6, 5), dtype=torch.uint8)
    out = op(codes, torch.tensor(1.0), torch.tensor(zero, dtype=torch.int32), None)
    assert torch.equal(out.double(), F.conv2d(codes.double() - zero, w.double(), None, 1, 1))
    # a linear with per-token zero points (a column of them)
    wl = _weights((7, 40), 4, 9)
    linear = backends.linear_kernel(("fp8",), backends.LayerNeeds(15, 15, 40, True), *shift_to_int8(wl),
                                    torch.ones(7), act_bits)
    rows = torch.randint(0, 2**act_bits, (5, 40), dtype=torch.uint8)
    zeros = torch.randint(0, 2**act_bits, (5, 1), dtype=torch.int32)
    out = linear(rows, torch.ones(5, 1), zeros, None)
    assert torch.equal(out.double(), (rows.double() - zeros) @ wl.double().t())


def test_fp8_takes_only_what_e4m3_holds_exactly():
    assert backends.pick(("fp8", "gemm"), backends.LayerNeeds(15, 15, 4608, False)).name == "fp8"
    assert backends.pick(("fp8", "gemm"), backends.LayerNeeds(255, 15, 4608, False)).name == "gemm"  # 8-bit codes
    assert backends.pick(("fp8", "gemm"), backends.LayerNeeds(15, 127, 4608, False)).name == "gemm"  # 8-bit weights
    assert backends.pick(("fp8", "gemm"), backends.LayerNeeds(15, 15, 80_000, False)).name == "gemm"  # sums ≥ 2^24
    assert backends.pick(("onednn", "gemm"), backends.LayerNeeds(15, 15, 64, True)).name == "gemm"  # per token
    assert backends.fp8_sums_exact("cpu")


def test_auto_and_named_backends_on_the_cpu(monkeypatch):
    assert backends.resolve_backend("auto", CPU) == ("onednn" if onednn_available() else "gemm")
    assert backends.backend_chain("fp8", CPU) == ("fp8", *(("onednn",) if onednn_available() else ()), "gemm")
    with pytest.raises(UserError, match="must be one of"):
        backends.resolve_backend("cutlass", CPU)
    if torch.cuda.is_available():
        return
    with pytest.raises(UserError, match="runs on cpu, not cuda"):
        backends.resolve_backend("onednn", torch.device("cuda"))
    monkeypatch.setattr(backends, "interpreting", lambda: False)
    with pytest.raises(UserError, match="TRITON_INTERPRET=1"):
        backends.resolve_backend("triton", CPU)
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    with pytest.raises(UserError, match="pip install triton"):
        backends.resolve_backend("triton", CPU)


def test_a_layer_mixes_backends_by_what_each_part_needs():
    """A split-input conv whose 4-bit part goes to fp8 and 8-bit part to the next backend, as loaded."""
    table = lambda bits, z: IntActQuantizer(bits, torch.tensor([0.1]), torch.tensor([z]), torch.zeros(1))  # noqa: E731
    w = _weights((6, 10, 3, 3), 4, 7)
    layer = IntConv2d(w, torch.rand(6) + 0.5, torch.randn(6), None, [table(4, 3), table(8, 128)], [4, 6],
                      (1, 1), (1, 1), (1, 1), 4, ("fp8", "gemm"))
    assert layer.backend == "fp8+gemm"
    reference = IntConv2d(w, layer.kernels[0].weight_scale, layer.bias, None, [table(4, 3), table(8, 128)], [4, 6],
                          (1, 1), (1, 1), (1, 1), 4, "gemm")
    set_step(layer, 0)
    set_step(reference, 0)
    x = torch.randn(2, 10, 5, 5)
    assert torch.equal(layer(x), reference(x))
    linear = IntLinear(_weights((5, 8), 8, 8), torch.ones(5), None, None, table(8, 128), 8, ("fp8", "gemm"))
    assert linear.backend == "gemm"


@pytest.mark.parametrize("backend", ["fp8", pytest.param("triton", marks=needs_triton)])
def test_a_whole_export_runs_each_backend_like_the_reference(backend, tmp_path):
    """The tiny UNet's W4A4 export on a GPU backend (its 8-bit conv_in / conv_out on the next one) against the
    gemm backend: the same integer sums, the float epilogue within rounding."""
    from dq.export import export_student
    from dq.sampling import unet_forward
    from tests.export.conftest import TINY_STEPS, TINY_TIMESTEPS, tiny_student

    _, student = tiny_student()
    path = export_student(student, tmp_path / "tiny.safetensors", TINY_TIMESTEPS)
    model, reference = load_int_model(path, backend=backend), load_int_model(path, backend="gemm")
    ran = {m.backend for m in model.modules() if isinstance(m, (IntConv2d, IntLinear))}
    assert backend in ran
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for step in range(TINY_STEPS):
            set_step(model, step)
            set_step(reference, step)
            t = torch.full((2,), TINY_TIMESTEPS[step])
            torch.testing.assert_close(unet_forward(model, x, t), unet_forward(reference, x, t), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backends_on_cuda_are_exact_and_capturable(tmp_path):
    """On a GPU: the compiled Triton kernel's sums against int64, fp8 usable where its probe passes, and a whole
    export's forward on the triton backend captured by a CUDA graph gives its eager output."""
    from dq.export import export_student
    from dq.sampling import unet_forward
    from tests.export.conftest import TINY_TIMESTEPS, tiny_student

    cuda = torch.device("cuda")
    w = _weights((40, 24, 3, 3), 8, 1)
    w8, shift = shift_to_int8(w)
    needs = backends.LayerNeeds(255, int(w.abs().max()), w[0].numel(), False)
    op = backends.conv_kernel(("triton",), needs, w8, shift, torch.ones(40), (1, 1), (1, 1), (1, 1), 8).move_to(cuda)
    x = _float_input((4, 24, 16, 16), 0.1, 100, 8, 3).cuda()
    scale, zero = torch.tensor(0.1, device=cuda), torch.tensor(100.0, device=cuda)
    sums = op.rows(x, None, scale, zero, 255, None, int_out=True).cpu()
    reference = F.conv2d(_reference_codes(x.cpu(), None, scale.cpu(), zero.cpu(), 8).double(), w.double(), None, 1, 1)
    assert torch.equal(sums.view(4, 16, 16, 40).permute(0, 3, 1, 2).long(), reference.long())
    print("fp8 usable on this GPU:", backends.why_unusable("fp8", cuda) or "yes")

    _, student = tiny_student()
    path = export_student(student, tmp_path / "tiny.safetensors", TINY_TIMESTEPS)
    model = load_int_model(path, device=cuda, backend="triton")
    set_step(model, 1)
    x = torch.randn(2, 3, 8, 8, device=cuda)
    t = torch.full((2,), TINY_TIMESTEPS[1], device=cuda)
    with torch.no_grad():
        eager = unet_forward(model, x, t)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            unet_forward(model, x, t)  # warm-up outside the capture (kernels compiled, workspaces allocated)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = unet_forward(model, x, t)
        graph.replay()
    torch.testing.assert_close(captured, eager)
