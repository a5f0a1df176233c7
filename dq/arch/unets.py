"""The diffusers UNet classes dq quantizes, by the class name their configs record, and a UNet built from a
config and per-module head counts (the integer runtime and student folders rebuild models this way)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from dq.arch.attention import set_attention_heads
from dq.errors import UserError

UNET_CLASSES: dict[str, type[nn.Module]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
}


def build_unet(class_name: str, config: Mapping[str, Any], heads: Mapping[str, int]) -> nn.Module:
    """A randomly initialised `class_name` UNet of `config` with these attention head counts. ValueError for
    a class dq does not know, or a config / head count that does not build one."""
    unet_class = UNET_CLASSES.get(class_name)
    if unet_class is None:
        raise UserError(f"UNet class {class_name!r} is not one of {sorted(UNET_CLASSES)}")
    try:
        unet = unet_class.from_config(dict(config))
        set_attention_heads(unet, heads)
    except (TypeError, ValueError) as err:
        raise UserError(f"its UNet config does not build a {class_name}: {err}") from err
    return unet
