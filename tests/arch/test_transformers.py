"""DiT and PixArt (diffusers' BasicTransformerBlock transformers) on tiny random configurations: the
description matches the forward pass, the student with quantizers off is the FP model, calibration from
the model's own trajectories, BKD for a few iterations per block, sampling, and the saved quant state."""

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel
from torch import nn

from dq.arch import describe
from dq.bkd import BlockDistiller, DistillConfig, candidate_blocks, execution_order
from dq.calibration import CalibrationDataModule
from dq.quant import (
    QuantConfig,
    load_quant_state,
    quantize_model,
    save_quant_state,
    set_quant_enabled,
    step_context,
)
from dq.sampling import SamplerConfig, sample, unet_forward
from tests.conftest import assert_replay_changes_nothing

T = 4
SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").config
SAMPLER = SamplerConfig(name="ddim", num_steps=T, eta=0.0, spacing="uniform")


def tiny_dit(seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=11).eval()


def tiny_pixart(seed: int = 0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
                                    num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                    caption_channels=12, norm_num_groups=4).eval()


MODELS = {"dit": tiny_dit, "pixart": tiny_pixart}


def _cond(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randint(10, (n,), generator=g) if kind == "dit" else torch.randn(n, 3, 12, generator=g)


def _example(kind: str, model: nn.Module, n: int = 4) -> dict[str, torch.Tensor]:
    channels = model.config.in_channels
    g = torch.Generator().manual_seed(1)
    return {"x_t": torch.randn(n, channels, 8, 8, generator=g), "timestep": torch.arange(n) * 200 + 10,
            "step": torch.arange(n) % T, "cond": _cond(kind, n)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_description_is_the_forward_order_and_holds_every_layer_once(kind):
    model = MODELS[kind]()
    arch = describe(model, required=True)
    blocks = list(arch.blocks)
    assert execution_order(model, blocks, _example(kind, model)) == blocks
    for layer in (n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        assert len([b for b in blocks if layer == b or layer.startswith(b + ".")]) == 1, layer
    assert arch.first_layers == ("pos_embed.proj",) and len(arch.attention) == (2 if kind == "dit" else 4)


# the transformer activation options (per-token Linear inputs, rotated inputs) beside the paper's per-tensor TPQ
OPTIONS = {"tensor": {}, "token+rotation": {"act_granularity": "token", "attn_granularity": "token", "rotation": True,
                                            "rotation_block": 8}}


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_student_with_quantizers_off_is_the_fp_model(kind, options):
    model = MODELS[kind]()
    student = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, num_steps=T, num_groups=T, **OPTIONS[options]),
                             describe(model))
    if options != "tensor":  # the options are in place: rotated weights, per-token quantizers on the Linears
        assert any(getattr(m, "rotation_signs", None) is not None for m in student.modules())
        processors = [m for m in student.modules() if hasattr(m, "q_quantizer")]
        assert processors and all(type(p.q_quantizer).__name__ == type(p.k_quantizer).__name__ == "TokenActQuantizer"
                                  and type(p.v_quantizer).__name__ == "TemporalActQuantizer" for p in processors)
        assert type(student.get_submodule("transformer_blocks.0.ff.net.2").act_quantizer).__name__ == "TokenActQuantizer"
    set_quant_enabled(student, weights=False, activations=False)
    batch = _example(kind, model)
    with torch.no_grad(), step_context(student, batch["step"]):
        got = unet_forward(student, batch["x_t"], batch["timestep"], batch["cond"])
        want = unet_forward(model, batch["x_t"], batch["timestep"], batch["cond"])
    assert got.shape == batch["x_t"].shape  # the noise half of a learned-sigma output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # WD kept: X/s · sW equals X · W


@pytest.mark.parametrize(("kind", "options"), [("dit", "tensor"), ("pixart", "tensor"), ("dit", "token+rotation")])
def test_calibration_bkd_sampling_and_saved_state(kind, options, tmp_path, caplog):
    model = MODELS[kind]()
    conditioning = ({"num_classes": 10} if kind == "dit"
                    else {"prompt_embeds": torch.randn(5, 3, 12, generator=torch.Generator().manual_seed(2))})
    data = CalibrationDataModule(model, SCHEDULER, SAMPLER, num_samples=32, num_trajectories=8,
                                 cache_dir=tmp_path / "cache", progress=False, **conditioning)
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
    assert images.shape == (4, model.config.in_channels, 8, 8) and torch.isfinite(images).all()
    save_quant_state(student, tmp_path / "student.safetensors")
    fresh = MODELS[kind]()
    loaded = load_quant_state(fresh, tmp_path / "student.safetensors", describe(fresh))
    again = sample(loaded, SCHEDULER, SAMPLER, 4, seed=0, batch_size=4, progress=False, cond=cond)
    torch.testing.assert_close(again, images, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_modulation_bits_apply_to_the_adaln_modulation_linears_only(kind):
    model = MODELS[kind]()
    modulation = set(describe(model).modulation_layers)
    assert modulation == ({"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear", "proj_out_1"}
                          if kind == "dit" else {"adaln_single.linear"})
    student = quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, modulation_bits=6, num_steps=T,
                                                num_groups=T), describe(model))
    bits = {n: (m.weight_quantizer.bits, m.act_quantizer.bits) for n, m in student.named_modules()
            if hasattr(m, "weight_quantizer")}
    for name, pair in bits.items():
        if name in modulation:
            assert pair == (6, 6), name
        elif name not in ("pos_embed.proj", "proj_out_2", "proj_out"):  # first / last layers: 8 bits
            assert pair == (4, 4), name
