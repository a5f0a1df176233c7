"""The embedded transformers ship in the package and load offline with their conditioning: the DiT (class
labels) and the PixArt-shaped model (a caption table, held apart from the DiT's tuning). Each draws the digit
asked for (read by dq's digit classifier) under classifier-free guidance."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dq.metrics.digit_classifier import accuracy, load_classifier
from dq.sampling import sample
from dq.zoo import load_model
from dq.zoo.loading import EMBEDDED_MODELS
from dq.zoo.recipe_digits import CAPTION_CHANNELS, CAPTION_TOKENS, caption_table

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CLASSES = {"dit": "DiTTransformer2DModel", "pixart": "PixArtTransformer2DModel"}


@pytest.fixture(scope="module", params=sorted(CLASSES))
def embedded(request):
    return request.param, load_model(OmegaConf.load(CONF_DIR / "model" / f"embedded_{request.param}.yaml"))


def test_embedded_transformer_is_small_and_conditional(embedded):
    name, bundle = embedded
    model = bundle.unet
    assert type(model).__name__ == CLASSES[name] and model.config.sample_size == 16
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (EMBEDDED_MODELS[name] / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size < 10 * 2**20
    conditioning = bundle.conditioning
    assert (conditioning.num_classes, conditioning.uncond_class) == (10, 10)
    assert bundle.sampler.guidance_scale is not None
    if name == "pixart":  # the recipe's caption table (seed 0), packed with an all-ones mask row
        assert conditioning.prompt_embeds.shape == (10, CAPTION_TOKENS + 1, CAPTION_CHANNELS)
        torch.testing.assert_close(conditioning.prompt_embeds[:, :CAPTION_TOKENS], caption_table(0)[:10])
        torch.testing.assert_close(conditioning.uncond_embeds[0, :CAPTION_TOKENS], caption_table(0)[10])


def test_samples_show_the_requested_digit(embedded):
    name, bundle = embedded
    labels = torch.arange(40) % 10
    cond, uncond = bundle.conditioning.for_indices(torch.arange(40))
    if name == "dit":
        assert torch.equal(cond, labels)
    images = sample(bundle.unet, bundle.scheduler.config, bundle.sampler, 40, seed=0, batch_size=40, progress=False,
                    cond=cond, uncond=uncond)
    classifier, _ = load_classifier()
    assert accuracy(classifier, images.clamp(-1, 1), labels) >= 0.8


def test_a_short_pixart_job_trains_a_rotated_per_token_student_with_a_kept_branch(tmp_path):
    """`train.py model=embedded_pixart`: a transformer, so per-token, rotated inputs (auto), here with a kept
    low-rank branch; calibration on its captions (half the rows the null caption), BKD, the fidelity check."""
    from dq.arch import describe
    from dq.jobs import train as train_job
    from dq.quant import QuantConfig, load_quant_state, lowrank_layers
    from tests.train.conftest import compose_config

    cfg = compose_config([
        "model=embedded_pixart", "model.sampler.num_steps=4", f"output_dir={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.num_samples=32", "data.num_trajectories=8", "data.progress=false",
        "method.distill.batch_size=8", "method.distill.capture_batch_size=32", "method.distill.iters_per_block=2",
        "method.distill.end_to_end_iters=1", "fidelity.num_samples=4", "fidelity.batch_size=4", "progress_bar=false",
        "checkpoint_every_n_steps=1000", "quant.lowrank_rank=2", "quant.lowrank_mode=keep"])
    results = train_job.train(cfg)
    config = QuantConfig.from_dict(results["quant_config"])
    assert (config.act_granularity, config.rotation, config.lowrank_rank) == ("token", True, 2)
    assert results["model"] == "embedded_pixart" and 0.0 < results["psnr_vs_fp"] < 100.0
    fresh = load_model(OmegaConf.load(CONF_DIR / "model" / "embedded_pixart.yaml")).unet
    student = load_quant_state(fresh, tmp_path / "out" / "student.safetensors", describe(fresh))
    assert "transformer_blocks.0.attn2.to_q" in lowrank_layers(student)
