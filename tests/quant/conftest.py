"""The quantization tests' tiny UNets: wider than the shared ones (so that W8A8 and W4A4 differ clearly),
3-channel pixels and 4-channel latents."""

import pytest
from diffusers import UNet2DConditionModel, UNet2DModel

from tests.conftest import make_tiny_text_unet, make_tiny_unet


def tiny_unet2d(seed: int = 0) -> UNet2DModel:
    """The ddpm-cifar10-32 block types (attention included) at toy width."""
    return make_tiny_unet(seed, channels=3, widths=(16, 32), groups=8, head_dim=8)


def tiny_unet2d_condition(seed: int = 0) -> UNet2DConditionModel:
    """Cross-attention UNet (Stable-Diffusion block types) at toy width."""
    return make_tiny_text_unet(seed, channels=4, widths=(16, 32), groups=8, cross_attention_dim=24, head_dim=8)


@pytest.fixture
def unet2d() -> UNet2DModel:
    return tiny_unet2d()


@pytest.fixture
def unet2d_condition() -> UNet2DConditionModel:
    return tiny_unet2d_condition()
