"""SD3 (MMDiT), Flux and Sana on tiny random configurations: the description matches the forward pass and
holds every layer once, the student with quantizers off is the FP model, calibration from the model's own
flow_euler trajectories, BKD for a few iterations per block (tuple outputs, Flux's shared rotary input,
Sana's depthwise conv), sampling, and the saved quant state; plus the flow sampler and the packed text
conditioning."""

import lightning as L
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
)
from torch import nn

from dq.arch import (
    describe,
    pack_text_conditioning,
    sample_shape,
    unpack_text_conditioning,
)
from dq.bkd import BlockDistiller, DistillConfig, candidate_blocks, execution_order
from dq.bkd.blocks import capture_block
from dq.calibration import CalibrationDataModule
from dq.errors import UnsupportedError, UserError
from dq.quant import (
    QuantAttnProcessor,
    QuantConfig,
    QuantConv2d,
    QuantJointAttnProcessor,
    load_quant_state,
    quantize_model,
    save_quant_state,
    set_quant_enabled,
    step_context,
)
from dq.quant.dilation import dilation_scale
from dq.sampling import SamplerConfig, build_scheduler, sample, unet_forward
from tests.conftest import assert_replay_changes_nothing

T = 4
SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).config
SAMPLER = SamplerConfig(name="flow_euler", num_steps=T, spacing="uniform")
TEXT_LEN, TEXT_DIM, POOLED = 3, 12, 10


def tiny_sd3(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=16,
                                 pooled_projection_dim=POOLED, out_channels=4, pos_embed_max_size=8).eval()


def tiny_flux(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                   pooled_projection_dim=POOLED, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    model.register_to_config(sample_size=8)  # latents 4 x 8 x 8 -> 16 tokens of 16 features
    return model.eval()


def tiny_sana(seed: int = 0) -> SanaTransformer2DModel:
    torch.manual_seed(seed)
    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=TEXT_DIM, mlp_ratio=2.0, sample_size=8,
                                  patch_size=2).eval()


MODELS = {"sd3": tiny_sd3, "flux": tiny_flux, "sana": tiny_sana}


def _cond(kind: str, n: int, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g)
    if kind == "sana":  # the attention mask: the last token is padding
        return pack_text_conditioning(embeds, torch.tensor([[1.0] * (TEXT_LEN - 1) + [0.0]]).repeat(n, 1))
    return pack_text_conditioning(embeds, torch.randn(n, POOLED, generator=g))


def _example(kind: str, model: nn.Module, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x_t": torch.randn(n, *sample_shape(model), generator=g), "timestep": torch.arange(n) * 200 + 100,
            "step": torch.arange(n) % T, "cond": _cond(kind, n)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_description_is_the_forward_order_and_holds_every_layer_once(kind):
    model = MODELS[kind]()
    arch = describe(model, required=True)
    blocks = list(arch.blocks)
    assert execution_order(model, blocks, _example(kind, model)) == blocks
    for layer in (n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        assert len([b for b in blocks if layer == b or layer.startswith(b + ".")]) == 1, layer
    layers = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert arch.modulation_layers and set(arch.modulation_layers) <= layers
    assert len(arch.attention) == {"sd3": 2, "flux": 3, "sana": 2}[kind]  # Sana: attn2; its linear attn1 stays float


# the transformer activation options (per-token Linear inputs and q / k, rotated inputs) beside the paper's
OPTIONS = {"tensor": {}, "token+rotation": {"act_granularity": "token", "attn_granularity": "token", "rotation": True,
                                            "rotation_block": 8}}


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_student_with_quantizers_off_is_the_fp_model(kind, options):
    model = MODELS[kind]()
    student = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, num_steps=T, num_groups=T, **OPTIONS[options]),
                             describe(model))
    if options != "tensor":
        assert any(getattr(m, "rotation_block", 1) == 8 for m in student.modules())
        assert any(type(m).__name__ == "TokenActQuantizer" for m in student.modules())
    processors = {type(student.get_submodule(name).processor) for name in describe(model).attention}
    assert processors == {QuantAttnProcessor if kind == "sana" else QuantJointAttnProcessor}
    set_quant_enabled(student, weights=False, activations=False)
    batch = _example(kind, model)
    with torch.no_grad(), step_context(student, batch["step"]):
        got = unet_forward(student, batch["x_t"], batch["timestep"], batch["cond"])
        want = unet_forward(model, batch["x_t"], batch["timestep"], batch["cond"])
    assert got.shape == batch["x_t"].shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # WD kept: X/s · sW equals X · W


def test_sana_depthwise_conv_is_quantized_with_unit_dilation():
    model = tiny_sana()
    student = quantize_model(model, QuantConfig(num_steps=T, num_groups=T), describe(model))
    depthwise = student.get_submodule("transformer_blocks.0.ff.conv_depth")
    assert isinstance(depthwise, QuantConv2d) and depthwise.groups == depthwise.in_channels == 64
    assert depthwise.wd_scale.shape == (64,) and bool((depthwise.wd_scale == 1).all())
    name = "transformer_blocks.0.ff.conv_point"  # a plain conv beside it is dilated as usual
    torch.testing.assert_close(student.get_submodule(name).wd_scale,
                               dilation_scale(model.get_submodule(name).weight), rtol=0, atol=0)


def test_flux_rotary_embedding_is_cached_once_not_sliced_per_sample():
    model = tiny_flux()
    batch = _example("flux", model, n=4)
    io = capture_block(model, "single_transformer_blocks.1", batch, want_output=True)
    assert len(io.shared) == 2  # the (cos, sin) pair, [tokens, head_dim] each
    shared = [io.leaves[i] for i in sorted(io.shared)]
    assert all(t.shape == (TEXT_LEN + 16, 8) for t in shared)
    rows = torch.tensor([2, 0])
    got = io.call(model.get_submodule("single_transformer_blocks.1"), rows)
    for g, full in zip(got, io.output):
        torch.testing.assert_close(g, full[rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kind", "options"), [(k, "tensor") for k in sorted(MODELS)] + [("flux", "token+rotation")])
def test_calibration_bkd_sampling_and_saved_state(kind, options, tmp_path, caplog):
    model = MODELS[kind]()
    data = CalibrationDataModule(model, SCHEDULER, SAMPLER, num_samples=32, num_trajectories=8,
                                 cache_dir=tmp_path / "cache", progress=False, prompt_embeds=_cond(kind, 5, seed=2))
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, end_to_end_iters=0)
    config = QuantConfig(weight_bits=4, act_bits=8, num_steps=T, num_groups=T, **OPTIONS[options])
    distiller = BlockDistiller(model, config, distill, data, seed=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=len(candidate_blocks(distiller.student)), logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with caplog.at_level("WARNING", logger="dq.bkd.distiller"):
        trainer.fit(distiller)
    assert distiller.state.block == len(distiller.blocks) == len(describe(model).blocks)
    assert_replay_changes_nothing(MODELS[kind], config, distill, data, distiller, caplog.text)
    assert all(torch.isfinite(torch.tensor(v)) for v in distiller.state.final_losses.values())
    student = distiller.student.eval()
    cond = _cond(kind, 4)
    images = sample(student, SCHEDULER, SAMPLER, 4, seed=0, batch_size=4, progress=False, cond=cond)
    assert images.shape == (4, *sample_shape(model)) and torch.isfinite(images).all()
    save_quant_state(student, tmp_path / "student.safetensors")
    fresh = MODELS[kind]()
    loaded = load_quant_state(fresh, tmp_path / "student.safetensors", describe(fresh))
    again = sample(loaded, SCHEDULER, SAMPLER, 4, seed=0, batch_size=4, progress=False, cond=cond)
    torch.testing.assert_close(again, images, rtol=0, atol=0)


def test_flow_sampler_levels_and_euler_step():
    scheduler = build_scheduler(SCHEDULER, SAMPLER)
    # s = 1, 0.75, 0.5, 0.25 shifted by 3: 1, 0.9, 0.75, 0.5, on the 1000-point grid, then 0
    assert scheduler.timesteps.tolist() == [1000, 900, 750, 500]
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0], dtype=torch.float64))
    x, v = torch.full((1, 2), 2.0), torch.full((1, 2), 4.0)
    torch.testing.assert_close(scheduler.step(v, 750, x)[0], x + (0.5 - 0.75) * v)
    # a velocity model that knows x_0 lands on it: v = noise - x_0 along the straight path
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    x = noise.clone()
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(noise - x0, t, x)[0]
    torch.testing.assert_close(x, x0)


def test_flow_sampler_bad_settings_are_clear_errors():
    with pytest.raises(UserError, match="spacing: uniform"):
        SamplerConfig(name="flow_euler", num_steps=4)  # the default spacing is DDIM's "quad"
    with pytest.raises(UserError, match="flow_euler sampler only"):
        SamplerConfig(name="ddim", shift=3.0)
    with pytest.raises(UserError, match="use_dynamic_shifting"):
        build_scheduler({"num_train_timesteps": 1000, "use_dynamic_shifting": True}, SAMPLER)
    dynamic = SamplerConfig(name="flow_euler", num_steps=T, spacing="uniform", shift=3.0)
    assert build_scheduler({"use_dynamic_shifting": True}, dynamic).timesteps.tolist() == [1000, 900, 750, 500]


def test_packed_text_conditioning_round_trip_and_errors():
    embeds, pooled = torch.randn(2, 3, 12), torch.randn(2, 10)
    packed = pack_text_conditioning(embeds, pooled)
    assert packed.shape == (2, 4, 12) and bool((packed[:, -1, 10:] == 0).all())
    got_embeds, got_pooled = unpack_text_conditioning(packed, 10)
    assert torch.equal(got_embeds, embeds) and torch.equal(got_pooled, pooled)
    with pytest.raises(UserError, match="wider"):
        pack_text_conditioning(embeds, torch.randn(2, 13))
    model = tiny_sd3()
    with pytest.raises(UnsupportedError, match="pack_text_conditioning"):
        unet_forward(model, torch.randn(1, 4, 8, 8), torch.tensor([500]), None)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=POOLED, axes_dims_rope=(2, 2, 4))
    with pytest.raises(UnsupportedError, match="register_to_config"):
        sample_shape(flux)
