"""Architecture descriptions of diffusers' image diffusion transformers with BasicTransformerBlock blocks:
DiTTransformer2DModel (class-conditional, adaLN-Zero) and PixArtTransformer2DModel (text cross-attention,
adaLN-single).

Execution order of their forward pass: the patch embedding (pos_embed), then, for PixArt, the timestep
embedding (adaln_single) and the caption projection, each transformer block, and the output layers (DiT:
proj_out_1, the final adaLN modulation, and proj_out_2; PixArt: proj_out). Each of those is one BKD block.
DiT computes its final modulation from the first block's label/timestep embedder (a module inside block 0
run again after the last block): that embedder is trained with block 0 and used, as trained, after it.
"""

from __future__ import annotations

import torch
from torch import nn

from dq.arch.attention import attention_modules
from dq.arch.description import Architecture, check_parts, has_layers, register
from dq.arch.text_conditioning import unpack_for
from dq.errors import UnsupportedError
from dq.quant.attention import quantize_attention


def _prediction(model: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The noise prediction: the first C channels when the model also predicts the variance (learn_sigma)."""
    return output[:, : x.shape[1]] if output.shape[1] != x.shape[1] else output


def _call_dit(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    if cond is None or torch.is_floating_point(cond):
        raise UnsupportedError("DiTTransformer2DModel is class-conditional: give class labels int64 [B] as cond")
    return _prediction(model, x, model(x, timestep=timesteps, class_labels=cond, return_dict=False)[0])


def _call_pixart(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None
                 ) -> torch.Tensor:
    """PixArt's call as PixArtAlphaPipeline / PixArtSigmaPipeline make it: the T5 embeddings with their
    attention mask, and at 1024 px on PixArt-α (use_additional_conditions) the resolution and aspect ratio,
    all from the packed conditioning (dq.arch.text_conditioning)."""
    embeds, fields = unpack_for(model, cond)
    added = {"resolution": fields.get("resolution"), "aspect_ratio": fields.get("aspect_ratio")}
    output = model(x, encoder_hidden_states=embeds, encoder_attention_mask=fields["mask"], timestep=timesteps,
                   added_cond_kwargs=added, return_dict=False)[0]
    return _prediction(model, x, output)


def describe_dit(model: nn.Module) -> Architecture:
    check_parts(model, ("pos_embed", "transformer_blocks", "norm_out", "proj_out_1", "proj_out_2"),
                "dq's description")
    blocks = ["pos_embed", *(f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))),
              "proj_out_1", "proj_out_2"]
    # adaLN-Zero: each block's norm1.linear gives its shift / scale / gate; proj_out_1 the final norm's
    modulation = (*(f"transformer_blocks.{i}.norm1.linear" for i in range(len(model.transformer_blocks))),
                  "proj_out_1")
    return Architecture(family="transformer2d", blocks=tuple(blocks), first_layers=("pos_embed.proj",),
                        last_layers=("proj_out_2",), attention=attention_modules(model),
                        quantize_attention=quantize_attention, modulation_layers=modulation)


def describe_pixart(model: nn.Module) -> Architecture:
    check_parts(model, ("pos_embed", "adaln_single", "caption_projection", "transformer_blocks", "norm_out",
                        "proj_out"), "dq's description")
    blocks = ["pos_embed", "adaln_single"]
    if has_layers(getattr(model, "caption_projection", None)):
        blocks.append("caption_projection")
    blocks += [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    blocks.append("proj_out")
    # adaLN-single: one linear gives every block's shift / scale / gate (each adds its own learned table)
    return Architecture(family="transformer2d", blocks=tuple(blocks), first_layers=("pos_embed.proj",),
                        last_layers=("proj_out",), attention=attention_modules(model),
                        quantize_attention=quantize_attention, modulation_layers=("adaln_single.linear",))


register("DiTTransformer2DModel", describe_dit, _call_dit)
register("PixArtTransformer2DModel", describe_pixart, _call_pixart)
