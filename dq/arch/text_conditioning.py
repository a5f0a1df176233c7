"""Text conditioning that is more than token embeddings, carried as one tensor.

dq carries a sample's conditioning as one tensor (calibration tuples, BKD caches, the samplers' cond and
uncond). Several families condition on more than the prompt's token embeddings [B, L, D]: SD3 and Flux on a
pooled projection, SDXL on a pooled projection and six size/crop ids, PixArt and Sana on the encoder's
attention mask (padding tokens must not be attended), PixArt-α at 1024 on the image resolution and aspect
ratio, FLUX.1-dev on the distilled guidance value. Those travel packed as [B, L + 1, D]: the L token rows,
then one row holding the extra fields one after another in its first features, zeros after.

    fields = text_fields(model)               # (("pooled", 768), ("guidance", 1)) for FLUX.1-dev
    cond = pack_text_conditioning(embeds, pooled, guidance)        # [B, L + 1, D]
    embeds, pooled, guidance = unpack_text_conditioning(cond, 768, 1)

A field whose size is None is as long as the token sequence (the attention mask: L features).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dq.errors import UnsupportedError, UserError

MASK = None  # the size of a field as long as the token sequence
SDXL_TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w): StableDiffusionXLPipeline._get_add_time_ids


def pack_text_conditioning(prompt_embeds: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
    """[B, L + 1, D]: the prompt embeddings [B, L, D], then one row with the extras [B, k_i] side by side in
    its first sum(k_i) features and zeros after."""
    if prompt_embeds.ndim != 3 or any(e.ndim != 2 or e.shape[0] != prompt_embeds.shape[0] for e in extras):
        raise UserError(f"pack_text_conditioning takes embeddings [B, L, D] and extras [B, k], got "
                        f"{tuple(prompt_embeds.shape)} and {[tuple(e.shape) for e in extras]}")
    width, used = prompt_embeds.shape[2], sum(int(e.shape[1]) for e in extras)
    if used > width:
        raise UserError(f"the conditioning's extra fields ({used} features) are wider than the embeddings ({width})")
    row = prompt_embeds.new_zeros(prompt_embeds.shape[0], 1, width)
    if extras:
        row[:, 0, :used] = torch.cat([e.to(device=row.device, dtype=row.dtype) for e in extras], dim=1)
    return torch.cat([prompt_embeds, row], dim=1)


def unpack_text_conditioning(cond: torch.Tensor, *sizes: int | None) -> tuple[torch.Tensor, ...]:
    """(prompt embeddings [B, L, D], extra_1 [B, k_1], ...) from pack_text_conditioning's tensor; a size
    of None (MASK) is the token count L."""
    embeds, row, start = cond[:, :-1], cond[:, -1], 0
    extras = []
    for size in sizes:
        size = embeds.shape[1] if size is MASK else int(size)
        extras.append(row[:, start : start + size])
        start += size
    return (embeds, *extras)


def _sdxl_fields(model: nn.Module) -> tuple[tuple[str, int | None], ...]:
    config = model.config
    if getattr(config, "addition_embed_type", None) != "text_time":
        return ()
    pooled = int(config.projection_class_embeddings_input_dim) - SDXL_TIME_IDS * int(config.addition_time_embed_dim)
    return (("pooled", pooled), ("time_ids", SDXL_TIME_IDS))


def _flux_fields(model: nn.Module) -> tuple[tuple[str, int | None], ...]:
    guidance = (("guidance", 1),) if getattr(model.config, "guidance_embeds", False) else ()
    return (("pooled", int(model.config.pooled_projection_dim)), *guidance)


def _pixart_fields(model: nn.Module) -> tuple[tuple[str, int | None], ...]:
    added = (("resolution", 2), ("aspect_ratio", 1)) if getattr(model, "use_additional_conditions", False) else ()
    return (("mask", MASK), *added)


_FIELDS: dict[str, Callable[[nn.Module], tuple[tuple[str, int | None], ...]]] = {
    "UNet2DConditionModel": _sdxl_fields,
    "SD3Transformer2DModel": lambda m: (("pooled", int(m.config.pooled_projection_dim)),),
    "FluxTransformer2DModel": _flux_fields,
    "PixArtTransformer2DModel": _pixart_fields,
    "SanaTransformer2DModel": lambda m: (("mask", MASK),),
}


def text_fields(model: nn.Module) -> tuple[tuple[str, int | None], ...]:
    """The extra fields (name, size) the denoiser's call reads from the packed row, in order; () for a model
    conditioned on the token embeddings alone (SD 1.x / 2.x, LDMs), whose cond is [B, L, D] unpacked."""
    fields = _FIELDS.get(type(model).__name__)
    return () if fields is None else fields(model)


def unpack_for(model: nn.Module, cond: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(embeddings [B, L, D], {field: [B, k]}) of the packed conditioning of a model with text_fields; a
    one-line error naming the layout when cond is not a packed text tensor."""
    fields = text_fields(model)
    if cond is None or not torch.is_floating_point(cond) or cond.ndim != 3 or cond.shape[1] < 2:
        names = ", ".join(n for n, _ in fields)
        raise UnsupportedError(f"{type(model).__name__} is text-conditional: give cond as pack_text_conditioning("
                               f"embeds, {names}) [B, L + 1, D]")
    embeds, *extras = unpack_text_conditioning(cond, *(size for _, size in fields))
    return embeds, dict(zip((name for name, _ in fields), extras, strict=True))
