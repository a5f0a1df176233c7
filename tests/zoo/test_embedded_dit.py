"""The embedded DiT ships in the package, loads offline with its conditioning, and draws the digit asked
for (read by dq's digit classifier) under classifier-free guidance."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dq.metrics.digit_classifier import accuracy, load_classifier
from dq.sampling import sample
from dq.zoo import load_model
from dq.zoo.loading import EMBEDDED_MODELS

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def embedded_dit():
    return load_model(OmegaConf.load(CONF_DIR / "model" / "embedded_dit.yaml"))


def test_embedded_dit_is_small_and_class_conditional(embedded_dit):
    model = embedded_dit.unet
    assert type(model).__name__ == "DiTTransformer2DModel" and model.config.sample_size == 16
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (EMBEDDED_MODELS["dit"] / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size < 10 * 2**20
    conditioning = embedded_dit.conditioning
    assert (conditioning.num_classes, conditioning.uncond_class) == (10, 10)
    assert embedded_dit.sampler.guidance_scale is not None


def test_samples_show_the_requested_digit(embedded_dit):
    labels = torch.arange(40) % 10
    cond, uncond = embedded_dit.conditioning.for_indices(torch.arange(40))
    assert torch.equal(cond, labels)
    images = sample(embedded_dit.unet, embedded_dit.scheduler.config, embedded_dit.sampler, 40, seed=0,
                    batch_size=40, progress=False, cond=cond, uncond=uncond)
    classifier, _ = load_classifier()
    assert accuracy(classifier, images.clamp(-1, 1), labels) >= 0.8
