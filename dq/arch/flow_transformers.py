"""Architecture descriptions of diffusers' flow-matching image transformers: SD3Transformer2DModel (MMDiT,
JointTransformerBlock), FluxTransformer2DModel (double-stream FluxTransformerBlock, then single-stream
FluxSingleTransformerBlock) and SanaTransformer2DModel (linear attention, GLU feed-forward with a
depthwise conv). They predict a velocity and are sampled with dq's flow_euler sampler (dq.sampling.flow).

BKD's blocks, in the order their forward passes run them:
  SD3:  pos_embed, time_text_embed, context_embedder, transformer_blocks.i, norm_out, proj_out
  Flux: x_embedder, time_text_embed, context_embedder, transformer_blocks.i, single_transformer_blocks.i,
        norm_out, proj_out
  Sana: patch_embed, time_embed, caption_projection, transformer_blocks.i, proj_out
A joint block returns (encoder_hidden_states, hidden_states) and BKD matches both; SD3's last block returns
(None, hidden_states). Flux's blocks share one rotary embedding with no batch dimension (shared_inputs).

Their text conditioning travels packed as [B, L + 1, D] (dq.arch.text_conditioning): the prompt's token
rows, then one row with SD3's and Flux's pooled projection (and FLUX.1-dev's distilled guidance value), or
Sana's attention mask.

Quantized attention matmuls (q, k, v, softmax output): SD3's and Flux's joint attention (dq.quant.attention.
QuantJointAttnProcessor) and Sana's cross-attention; Sana's linear self-attention (no softmax) stays in float.
Not yet: Sana-Sprint (guidance_embeds).
"""

from __future__ import annotations

import torch
from torch import nn

from dq.arch.description import Architecture, check_parts, register
from dq.arch.text_conditioning import unpack_for
from dq.errors import UnsupportedError, UserError
from dq.quant.attention import quantize_attention, quantize_joint_attention


def timestep_input_scale(model: nn.Module) -> float:
    """What the denoiser's timestep input is in units of dq's timestep t (the 1000-point grid), as the
    family's stock pipeline calls it: FluxPipeline passes σ = t/1000, SanaPipeline t times the config's
    timestep_scale; the other denoisers take t itself."""
    name = type(model).__name__
    if name == "FluxTransformer2DModel":
        return 1.0 / 1000
    if name == "SanaTransformer2DModel":
        return float(getattr(model.config, "timestep_scale", 1.0))
    return 1.0


def _call_sd3(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    embeds, fields = unpack_for(model, cond)
    return model(x, encoder_hidden_states=embeds, pooled_projections=fields["pooled"], timestep=timesteps.to(x.dtype),
                 return_dict=False)[0]


def _call_flux(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """Flux takes the latents as 2x2 patches [B, (H/2)(W/2), 4C] with their (0, row, col) position ids and
    σ = t / 1000 as its timestep, and FLUX.1-dev the distilled guidance value of its conditioning row (as
    FluxPipeline passes its guidance_scale); the output is unpacked back to [B, C, H, W]."""
    embeds, fields = unpack_for(model, cond)
    guidance = fields["guidance"][:, 0].to(x.dtype) if "guidance" in fields else None
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise UserError(f"Flux packs 2x2 latent patches: height and width must be even, got {h}x{w}")
    tokens = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    img_ids[..., 1] = torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
    img_ids[..., 2] = torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
    txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
    out = model(tokens, encoder_hidden_states=embeds, pooled_projections=fields["pooled"], guidance=guidance,
                timestep=timesteps.to(x.dtype) * timestep_input_scale(model), img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids,
                return_dict=False)[0]
    channels = out.shape[-1] // 4
    return out.reshape(b, h // 2, w // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, h, w)


def _call_sana(model: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    if getattr(model.config, "guidance_embeds", False):
        raise UnsupportedError("SanaTransformer2DModel with guidance_embeds (Sana-Sprint) is not supported by dq yet")
    embeds, fields = unpack_for(model, cond)
    timestep = timesteps.to(x.dtype) * timestep_input_scale(model)
    return model(x, encoder_hidden_states=embeds, encoder_attention_mask=fields["mask"], timestep=timestep,
                 return_dict=False)[0]


def _flux_shape(model: nn.Module) -> tuple[int, int, int]:
    size = getattr(model.config, "sample_size", None)
    if size is None:
        raise UnsupportedError("FluxTransformer2DModel's config records no latent size; set it with "
                               "model.register_to_config(sample_size=128) (1024 px images) before sampling")
    height, width = (size, size) if isinstance(size, int) else size
    return int(model.config.in_channels) // 4, int(height), int(width)


def _numbered(prefix: str, count: int, suffixes: tuple[str, ...] = ("",)) -> list[str]:
    return [f"{prefix}.{i}{suffix}" for i in range(count) for suffix in suffixes]


def describe_sd3(model: nn.Module) -> Architecture:
    check_parts(model, ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks", "norm_out",
                        "proj_out"), "dq's description")
    n = len(model.transformer_blocks)
    blocks = ["pos_embed", "time_text_embed", "context_embedder", *_numbered("transformer_blocks", n), "norm_out",
              "proj_out"]
    modulation = (*_numbered("transformer_blocks", n, (".norm1.linear", ".norm1_context.linear")), "norm_out.linear")
    attention = tuple(f"transformer_blocks.{i}.{a}" for i in range(n) for a in ("attn", "attn2")
                      if getattr(model.transformer_blocks[i], a, None) is not None)  # attn2: SD3.5's second one
    return Architecture(family="mmdit", blocks=tuple(blocks), first_layers=("pos_embed.proj",),
                        last_layers=("proj_out",), modulation_layers=modulation, attention=attention,
                        quantize_attention=quantize_joint_attention)


def describe_flux(model: nn.Module) -> Architecture:
    check_parts(model, ("time_text_embed", "context_embedder", "x_embedder", "transformer_blocks",
                        "single_transformer_blocks", "norm_out", "proj_out"), "dq's description")
    double, single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    blocks = ["x_embedder", "time_text_embed", "context_embedder", *_numbered("transformer_blocks", double),
              *_numbered("single_transformer_blocks", single), "norm_out", "proj_out"]
    modulation = (*_numbered("transformer_blocks", double, (".norm1.linear", ".norm1_context.linear")),
                  *_numbered("single_transformer_blocks", single, (".norm.linear",)), "norm_out.linear")
    attention = (*_numbered("transformer_blocks", double, (".attn",)),
                 *_numbered("single_transformer_blocks", single, (".attn",)))
    return Architecture(family="mmdit", blocks=tuple(blocks), first_layers=("x_embedder",),
                        last_layers=("proj_out",), modulation_layers=modulation, attention=attention,
                        quantize_attention=quantize_joint_attention,
                        shared_inputs=("image_rotary_emb", "img_ids", "txt_ids"))


def describe_sana(model: nn.Module) -> Architecture:
    check_parts(model, ("patch_embed", "time_embed", "caption_projection", "caption_norm", "transformer_blocks",
                        "norm_out", "proj_out"), "dq's description")
    blocks = ["patch_embed", "time_embed", "caption_projection", *_numbered("transformer_blocks",
                                                                           len(model.transformer_blocks)), "proj_out"]
    # attn2 (cross-attention to the caption) is softmax attention; attn1 is linear attention (ReLU kernels, no
    # softmax), whose matmuls stay in float
    attention = _numbered("transformer_blocks", len(model.transformer_blocks), (".attn2",))
    return Architecture(family="sana", blocks=tuple(blocks), first_layers=("patch_embed.proj",),
                        last_layers=("proj_out",), modulation_layers=("time_embed.linear",),
                        attention=tuple(attention), quantize_attention=quantize_attention)


register("SD3Transformer2DModel", describe_sd3, _call_sd3)
register("FluxTransformer2DModel", describe_flux, _call_flux, sample_shape=_flux_shape)
register("SanaTransformer2DModel", describe_sana, _call_sana)
