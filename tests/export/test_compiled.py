"""The integer model under torch.compile (`dq.export.compile_int_model`): each integer layer compiled gives
bitwise its eager output, one graph serves every sampling step, the sampler and the timestep keying drive it,
and bfloat16 glue stays near the float32 model."""

import pytest
import torch
from torch._dynamo.utils import counters

from dq.errors import UserError
from dq.export import compile_int_model, compiled, export_student, load_int_model
from dq.export.kernels import onednn_available
from dq.export.layers import IntConv2d, IntLinear
from dq.quant import set_step, step_context
from dq.quant.timesteps import timestep_keying
from dq.sampling import SamplerConfig, sample, unet_forward
from tests.export.conftest import TINY_STEPS, TINY_TIMESTEPS, tiny_student

pytestmark = pytest.mark.skipif(not onednn_available(), reason="the compiled integer path runs oneDNN's CPU kernels")
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(FP UNet, fake-quant W4A4 student, export path) of the tiny UNet: 8-bit conv_in/conv_out (weights that
    need the shift correction), 4-bit resnets, attention, split skip inputs."""
    unet, student = tiny_student()
    path = export_student(student, tmp_path_factory.mktemp("compiled") / "tiny.safetensors", TINY_TIMESTEPS)
    return unet, student, path


def _inputs(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(3))


def test_each_integer_layer_compiled_is_bitwise_its_eager_self(tiny):
    _, _, path = tiny
    eager_model = load_int_model(path)
    seen: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args, output) -> None:
            seen.setdefault(name, args[0].clone())
        return hook

    handles = [m.register_forward_hook(keep_input(n)) for n, m in eager_model.named_modules()
               if isinstance(m, (IntConv2d, IntLinear))]
    with torch.no_grad(), step_context(eager_model, 1):
        unet_forward(eager_model, _inputs(), torch.full((2,), TINY_TIMESTEPS[1]))
    for handle in handles:
        handle.remove()
    layers = dict(eager_model.named_modules())
    chosen = ["conv_in", "down_blocks.0.resnets.0.conv1", "time_embedding.linear_1"]
    chosen += [next(n for n in seen if len(layers[n].splits) > 1)]  # a split skip input
    assert layers["conv_in"].kernels[0].shift is not None  # 8-bit weights: the shift correction is compiled too
    for name in chosen:
        layer = layers[name]
        with torch.no_grad(), step_context(layer, 1):
            expected = layer(seen[name])
        compiled = compile_int_model(layer)
        with step_context(compiled, 1):
            torch.testing.assert_close(compiled(seen[name]), expected, rtol=0, atol=0, msg=name)


def test_one_graph_serves_every_step_and_samples_like_the_eager_model(tiny):
    unet, student, path = tiny
    eager_model = load_int_model(path)
    model = compile_int_model(load_int_model(path))
    x = _inputs()
    before = counters["stats"]["unique_graphs"]
    for step in range(TINY_STEPS):
        t = torch.full((2,), TINY_TIMESTEPS[step])
        with torch.no_grad(), step_context(student, step), step_context(eager_model, step):
            fake, eager, fp = unet_forward(student, x, t), unet_forward(eager_model, x, t), unet_forward(unet, x, t)
        compiled = unet_forward(model, x, t)  # keyed by its timestep, resolved outside the graph
        with step_context(model, step):
            assert torch.equal(unet_forward(model, x, t), compiled)  # an explicit step: the same row
        # the integer layers are exact (here the whole model is bitwise eager's); fused float glue (GroupNorm)
        # may round its last bit differently on another CPU and flip a code now and then
        assert (compiled - eager).pow(2).mean() < 1e-2 * (fake - fp).pow(2).mean(), f"step {step}"
    # a smaller batch (a sampling run's last) runs padded to the compiled one: its rows are the batch's own,
    # and no second graph is compiled
    with step_context(model, 0):
        whole = unet_forward(model, x, torch.full((2,), TINY_TIMESTEPS[0]))
        short = unet_forward(model, x[:1], torch.full((1,), TINY_TIMESTEPS[0]))
    assert short.shape == (1, *whole.shape[1:]) and torch.equal(short, whole[:1])
    assert counters["stats"]["unique_graphs"] - before == 1
    sampler = SamplerConfig(num_steps=TINY_STEPS, spacing="uniform")
    with pytest.raises(UserError, match="not in the schedule"):  # the keying still refuses other schedules
        sample(model, SCHEDULER, sampler, 1, progress=False)


def test_bf16_glue_stays_within_the_quantization_error(tiny, monkeypatch):
    """bf16 between layers rounds each layer's output to 8 bits of mantissa, which flips 4-bit codes of the
    next layer: on this tiny random model it moved the output by up to 0.8x the quantization error itself
    (float32 glue: bitwise eager's here, the test above), why float32 is the default."""
    unet, student, path = tiny
    eager_model = load_int_model(path)
    monkeypatch.setattr(compiled, "native_bf16", lambda: True)  # emulated where it is not: slow, still correct
    model = compile_int_model(load_int_model(path), glue="bf16")
    x = _inputs()
    for step in range(TINY_STEPS):
        t = torch.full((2,), TINY_TIMESTEPS[step])
        with torch.no_grad(), step_context(student, step), step_context(eager_model, step):
            fake, eager, fp = unet_forward(student, x, t), unet_forward(eager_model, x, t), unet_forward(unet, x, t)
        out = unet_forward(model, x, t)
        assert out.dtype == torch.float32
        assert (out - eager).pow(2).mean() < (fake - fp).pow(2).mean(), f"step {step}"
    assert any(p.dtype == torch.bfloat16 for p in model.model.parameters())


def test_bad_inputs_give_one_line_errors(tiny, monkeypatch):
    unet, _, path = tiny
    with pytest.raises(UserError, match="glue must be one of"):
        compile_int_model(load_int_model(path), glue="fp16")
    with pytest.raises(UserError, match="no TPQ tables"):
        compile_int_model(unet)
    with monkeypatch.context() as patch:
        patch.setattr(compiled, "native_bf16", lambda: False)
        with pytest.raises(UserError, match="native bfloat16"):
            compile_int_model(load_int_model(path), glue="bf16")
    model = compile_int_model(load_int_model(path))
    set_step(model, torch.tensor([0, 1]))
    with pytest.raises(UserError, match="one sampling step per call"):
        model(_inputs(), torch.tensor([900, 500]))
    set_step(model, None)
    timestep_keying(model.model).detach()
    with pytest.raises(UserError, match="set the sampling step"):
        model(_inputs(), torch.tensor([900, 900]))


def test_interpolated_steps_run_compiled_as_eager(tiny):
    _, _, path = tiny
    eager_model = load_int_model(path, tpq_policy="interpolate")
    model = compile_int_model(load_int_model(path, tpq_policy="interpolate"))
    t = torch.full((2,), 700)  # between trained timesteps (900, 500): TPQ rows blended, the blend a graph input
    with torch.no_grad():
        expected = unet_forward(eager_model, _inputs(), t)
    torch.testing.assert_close(unet_forward(model, _inputs(), t), expected, rtol=1e-5, atol=1e-5)


def test_a_smaller_batch_is_padded_to_a_compiled_one_but_not_its_position_ids(tiny):
    """Without compiling: the graph replaced by a recorder of what it is given."""
    _, _, path = tiny
    model = compile_int_model(load_int_model(path))
    seen = []

    def graph(step, args, kwargs):
        seen.append((args[0].shape[0], args[1].shape[0], {k: v.shape[0] for k, v in kwargs.items()}))
        return args[0] * 2

    model._compiled = graph
    set_step(model, 0)
    x = _inputs(3)
    assert torch.equal(model(x, torch.full((3,), 900)), x * 2)  # batch 3: compiled as it is
    ids = torch.zeros(2, 3)  # token positions whose count happens to equal the batch
    out = model(x[:2], torch.full((2,), 900), cond=torch.ones(2, 4), img_ids=ids)
    assert torch.equal(out, x[:2] * 2)
    assert seen[-1] == (3, 3, {"cond": 3, "img_ids": 2})  # padded to 3 rows, the position ids left alone
    model(x, torch.full((3,), 900), cond=torch.ones(3, 4))
    assert seen[-1] == (3, 3, {"cond": 3})
