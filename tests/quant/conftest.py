"""Tiny randomly initialised diffusers UNets (built from config, no network) for the quantization tests."""

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel


def tiny_unet2d(seed: int = 0) -> UNet2DModel:
    """Same block types as ddpm-cifar10-32 (attention included), at toy width."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


def tiny_unet2d_condition(seed: int = 0) -> UNet2DConditionModel:
    """Cross-attention UNet (Stable-Diffusion block types) at toy width."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        cross_attention_dim=24,
        attention_head_dim=8,
    ).eval()


@pytest.fixture
def unet2d() -> UNet2DModel:
    return tiny_unet2d()


@pytest.fixture
def unet2d_condition() -> UNet2DConditionModel:
    return tiny_unet2d_condition()
