"""UNet architectures of the paper's settings, built from config with random weights (for benchmarks:
timing and memory do not depend on the weights), and random inputs of their shape."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn

from dq.zoo.convert_compvis import diffusers_unet_from_params

# google/ddpm-cifar10-32 (35.7M parameters), the paper's CIFAR-10 model
DDPM_CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}

# a small model of the same block types, for CPU runs of the benchmarks
SMALL = {**DDPM_CIFAR10, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "norm_num_groups": 8}

# two levels of the same blocks (one with attention): what a compiled run needs to cover, compiled in a
# fraction of `small`'s time (the tests' compiled bench)
TINY = {**SMALL, "sample_size": 16, "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}

ARCHITECTURES = {"ddpm_cifar10": DDPM_CIFAR10, "small": SMALL, "tiny": TINY}

# the LDM UNets (unet_config.params of configs/latent-diffusion/*.yaml), as dq.zoo.convert_compvis builds them
_LDM_COMMON = {"num_res_blocks": 2, "attention_resolutions": [8, 4, 2], "image_size": 64, "in_channels": 3,
               "out_channels": 3}
LDM_UNETS = {
    "ldm_bedroom": {**_LDM_COMMON, "model_channels": 224, "channel_mult": [1, 2, 3, 4], "num_head_channels": 32},
    "ldm_church": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
                   "attention_resolutions": [1, 2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4, 4],
                   "num_heads": 8, "use_scale_shift_norm": True, "resblock_updown": True},
    "ldm_imagenet": {**_LDM_COMMON, "model_channels": 192, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
                     "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512},
}


def build(name: str) -> nn.Module:
    if name in LDM_UNETS:
        return diffusers_unet_from_params(LDM_UNETS[name])
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES) + sorted(LDM_UNETS)}")
    return UNet2DModel(**ARCHITECTURES[name]).eval()


def random_inputs(unet: nn.Module, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """{"x_t": [n, C, H, W]} of the model's input shape, plus "cond" [n, 1, D] (a one-token context, as the
    class-conditional LDM's) for a cross-attention UNet."""
    cfg = unet.config
    inputs = {"x_t": torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator)}
    if cfg.get("cross_attention_dim") is not None:
        inputs["cond"] = torch.randn(n, 1, cfg.cross_attention_dim, generator=generator)
    return inputs
