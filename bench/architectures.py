"""UNet architectures of the paper's settings, built from config with random weights (for benchmarks:
timing and memory do not depend on the weights)."""

from __future__ import annotations

from diffusers import UNet2DModel

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

ARCHITECTURES = {"ddpm_cifar10": DDPM_CIFAR10, "small": SMALL}


def build(name: str) -> UNet2DModel:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return UNet2DModel(**ARCHITECTURES[name]).eval()
