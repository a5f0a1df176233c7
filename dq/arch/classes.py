"""The diffusers denoiser classes dq quantizes (UNets and image transformers), by the class name their
configs record, and a model built from a config and per-module head counts (the integer runtime and
student folders rebuild models this way)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from torch import nn

from dq.arch.attention import set_attention_heads
from dq.errors import UserError

DENOISER_CLASSES: dict[str, type[nn.Module]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "DiTTransformer2DModel": DiTTransformer2DModel,
    "PixArtTransformer2DModel": PixArtTransformer2DModel,
    "SD3Transformer2DModel": SD3Transformer2DModel,
    "FluxTransformer2DModel": FluxTransformer2DModel,
    "SanaTransformer2DModel": SanaTransformer2DModel,
}


def build_denoiser(class_name: str, config: Mapping[str, Any], heads: Mapping[str, int]) -> nn.Module:
    """A randomly initialised `class_name` denoiser of `config` with these attention head counts.
    ValueError for a class dq does not know, or a config / head count that does not build one."""
    unet_class = DENOISER_CLASSES.get(class_name)
    if unet_class is None:
        raise UserError(f"denoiser class {class_name!r} is not one of {sorted(DENOISER_CLASSES)}")
    try:
        unet = unet_class.from_config(dict(config))
        set_attention_heads(unet, heads)
    except (TypeError, ValueError) as err:
        raise UserError(f"its config does not build a {class_name}: {err}") from err
    return unet
