"""The architecture description of diffusers' 2-D UNets (UNet2DModel: DDPM, LDM; UNet2DConditionModel:
Stable Diffusion, class- or text-conditional LDMs).

Execution order of their forward pass: the timestep embedding (then the class / added embeddings and the
encoder projection, where present), conv_in, each down block (resnet i, then attention i, for every i;
then its downsamplers), the mid block (resnet 0, then attention i and resnet i + 1), each up block (as the
down blocks, with upsamplers), conv_out. Each resnet and attention module is one BKD block; so is each
down/up-sampler and each embedding module. The down path pushes conv_in's output and each down resnet's /
downsampler's output on a stack; each up resnet's input is the concatenation [h, popped skip].
"""

from __future__ import annotations

import torch
from torch import nn

from dq.arch.attention import attention_modules
from dq.arch.description import Architecture, check_parts, cond_kwargs, has_layers, register
from dq.arch.text_conditioning import text_fields, unpack_for
from dq.errors import UnsupportedError, UserError
from dq.quant.attention import quantize_attention

# top-level children that run before conv_in, in forward order (each present one with layers is a block)
EMBEDDINGS = ("time_embedding", "class_embedding", "add_embedding", "encoder_hid_proj")
# top-level children that are not blocks of their own (no Conv2d/Linear, or handled below)
STRUCTURE = ("time_proj", "add_time_proj", "time_embed_act", "conv_in", "down_blocks", "mid_block", "up_blocks",
             "conv_norm_out", "conv_act", "conv_out")
SAMPLERS = ("downsamplers", "upsamplers")


def _children(module: nn.Module, attr: str) -> list[nn.Module | None]:
    value = getattr(module, attr, None)
    return list(value) if value is not None else []


def _stage_blocks(prefix: str, stage: nn.Module, mid: bool = False) -> list[str]:
    """The blocks of one down / mid / up block of the UNet, in forward order."""
    resnets, attentions = _children(stage, "resnets"), _children(stage, "attentions")
    names: list[str] = []
    if mid:  # resnet 0, then (attention i, resnet i + 1)
        names.append(f"{prefix}.resnets.0")
        for i in range(1, len(resnets)):
            if i - 1 < len(attentions) and attentions[i - 1] is not None:
                names.append(f"{prefix}.attentions.{i - 1}")
            names.append(f"{prefix}.resnets.{i}")
    else:
        for i in range(len(resnets)):
            names.append(f"{prefix}.resnets.{i}")
            if i < len(attentions) and attentions[i] is not None:
                names.append(f"{prefix}.attentions.{i}")
    for attr in SAMPLERS:
        names += [f"{prefix}.{attr}.{j}" for j in range(len(_children(stage, attr)))]
    known = {"resnets", "attentions", *SAMPLERS}
    others = [name for name, child in stage.named_children() if name not in known and has_layers(child)]
    if others:
        raise UnsupportedError(
            f"{prefix} ({type(stage).__name__}) has layers outside its resnets/attentions/samplers ({others}); "
            "dq's UNet description does not know this block type"
        )
    return names


def skip_splits(model: nn.Module) -> dict[str, int]:
    """{conv1 / conv_shortcut of each up resnet: channels of h in its input [h, skip]}."""
    stack = [model.conv_in.out_channels]
    for block in model.down_blocks:
        stack += [resnet.out_channels for resnet in _children(block, "resnets")]
        stack += [down.out_channels for down in _children(block, "downsamplers")]
    splits = {}
    for i, block in enumerate(model.up_blocks):
        for j, resnet in enumerate(_children(block, "resnets")):
            if not stack:
                raise UserError("up path consumes more skip connections than the down path produced")
            split = resnet.in_channels - stack.pop()
            for layer in ("conv1", "conv_shortcut"):
                if getattr(resnet, layer, None) is not None:
                    splits[f"up_blocks.{i}.resnets.{j}.{layer}"] = split
    if stack:
        raise UserError(f"{len(stack)} skip connection(s) of the down path are not consumed by the up path")
    return splits


def describe_unet2d(model: nn.Module) -> Architecture:
    check_parts(model, EMBEDDINGS + STRUCTURE, "dq's UNet description")
    blocks = [n for n in EMBEDDINGS if has_layers(getattr(model, n, None))]
    blocks.append("conv_in")
    for i, stage in enumerate(model.down_blocks):
        blocks += _stage_blocks(f"down_blocks.{i}", stage)
    if getattr(model, "mid_block", None) is not None:
        blocks += _stage_blocks("mid_block", model.mid_block, mid=True)
    for i, stage in enumerate(model.up_blocks):
        blocks += _stage_blocks(f"up_blocks.{i}", stage)
    blocks.append("conv_out")
    return Architecture(
        family="unet2d",
        blocks=tuple(blocks),
        first_layers=("conv_in",),
        last_layers=("conv_out",),
        skip_splits=skip_splits(model),
        attention=attention_modules(model),
        quantize_attention=quantize_attention,
    )


def _call_unet_condition(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None
                         ) -> torch.Tensor:
    """A conditional UNet's call: the embeddings or class labels as they are (SD 1.x / 2.x, LDMs), or for
    SDXL (addition_embed_type text_time) the embeddings with the pooled projection and the size / crop ids
    of the packed conditioning (dq.arch.text_conditioning), as StableDiffusionXLPipeline passes them."""
    if not text_fields(model):
        return model(x, timesteps, return_dict=False, **cond_kwargs(cond))[0]
    embeds, fields = unpack_for(model, cond)
    added = {"text_embeds": fields["pooled"], "time_ids": fields["time_ids"]}
    return model(x, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


register("UNet2DModel", describe_unet2d)
register("UNet2DConditionModel", describe_unet2d, _call_unet_condition)
