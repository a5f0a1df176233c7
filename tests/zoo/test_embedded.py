"""The embedded digits model ships in the package, loads offline and samples digit-like images."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dq.sampling import SamplerConfig, sample
from dq.zoo import EMBEDDED_MODEL_DIR, load_model

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def embedded():
    return load_model(OmegaConf.load(CONF_DIR / "model" / "embedded.yaml"))


def test_embedded_model_is_small_and_has_default_sampler(embedded):
    unet, scheduler, sampler = embedded.unet, embedded.scheduler, embedded.sampler
    assert sampler == SamplerConfig(name="ddim", num_steps=25, eta=0.0, spacing="quad", guidance_scale=None)
    assert (unet.config.sample_size, unet.config.in_channels, unet.config.out_channels) == (16, 1, 1)
    assert "AttnDownBlock2D" in unet.config.down_block_types and "AttnUpBlock2D" in unet.config.up_block_types
    assert sum(p.numel() for p in unet.parameters()) < 2_000_000
    assert (EMBEDDED_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 10 * 2**20
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_schedule == "linear"


def test_short_ddim_run_is_reproducible_and_looks_like_digits(embedded):
    unet, scheduler = embedded.unet, embedded.scheduler
    short = SamplerConfig(name="ddim", num_steps=10, eta=0.0, spacing="quad")
    images = sample(unet, scheduler.config, short, 16, seed=0, batch_size=16, progress=False)
    assert torch.equal(images, sample(unet, scheduler.config, short, 16, seed=0, batch_size=16, progress=False))
    assert images.shape == (16, 1, 16, 16) and images.min() >= -1.0 and images.max() <= 1.0
    # like the training digits (dq.data.load_digit_images): dark background (~55% of pixels below -0.5),
    # bright strokes (~14% above 0.5); pure noise or a blank image would fail this
    dark, bright = (images < -0.5).float().mean().item(), (images > 0.5).float().mean().item()
    assert 0.35 < dark < 0.8 and 0.08 < bright < 0.35, (dark, bright)


def test_64_samples_at_default_steps(embedded):
    """The speed figure (64 samples, default steps) comes from bench/bench_sampling.py, not from here."""
    unet, scheduler, sampler = embedded.unet, embedded.scheduler, embedded.sampler
    images = sample(unet, scheduler.config, sampler, 64, seed=0, batch_size=64, progress=False)
    assert images.shape == (64, 1, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0
