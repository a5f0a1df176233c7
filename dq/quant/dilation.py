"""Weight Dilation (docs/method.md §2, eqs 5, 10-12): an equivalent per-input-channel scaling Y = (X/s)(s·W).

Weights are quantized per output channel, so only the elements that hold a row's max or min set Δ_w.
Every other ("unsaturated") input channel is enlarged as far as it can go without changing any row's
range; the activation is divided by the same s, which shrinks its range before its (per-tensor) quantizer.
"""

from __future__ import annotations

import torch

from dq.errors import UserError


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """[O, I, *kernel] -> [O, I, K] with K the kernel taps (1 for a Linear weight)."""
    if weight.ndim < 2:
        raise UserError(f"weight must be [O, I] or [O, I, kh, kw], got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def apply_dilation(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s·W: multiply input channel k of weight [O, I, ...] by scale[k] (eq. 10)."""
    return weight * scale.reshape([1, -1] + [1] * (weight.ndim - 2))


def dilation_scale(weight: torch.Tensor, max_scale: float | None = None) -> torch.Tensor:
    """The Weight Dilation factor s [I] of a Conv2d [O, I, kh, kw] or Linear [O, I] weight (eqs 11-12).

    s_k = min over out-channels o and taps of W_max[o]/W[o,k] (W[o,k] > 0) and W_min[o]/W[o,k]
    (W[o,k] < 0); zero entries are masked; s_k = 1 where channel k holds the max or the min of some row
    (the set A) or is all zero. Guarantees, exactly in the weight's dtype: per-out-channel max and min
    of apply_dilation(weight, s) equal those of weight, and s >= 1. `max_scale` caps s (ablation only).
    """
    if max_scale is not None and max_scale < 1.0:
        raise UserError(f"max_scale must be >= 1 or None, got {max_scale}")
    if not weight.is_floating_point():
        raise UserError(f"weight must be a floating-point tensor, got {weight.dtype}")
    w = _rows(weight.detach())
    if not torch.isfinite(w).all():
        raise UserError("weight contains NaN or Inf; Weight Dilation needs finite weights")
    row_max = w.amax(dim=(1, 2), keepdim=True)  # [O, 1, 1]
    row_min = w.amin(dim=(1, 2), keepdim=True)
    inf = torch.full_like(w, float("inf"))
    # eq. 11: how far each element can grow before it reaches its row's max (positive) or min (negative)
    ratio = torch.where(w > 0, row_max / w, inf)
    ratio = torch.where(w < 0, row_min / w, ratio)
    scale = ratio.amin(dim=(0, 2))  # [I]
    # the set A: a channel holding a row's max or min keeps s = 1 (the ratio alone misses a positive
    # min of an all-positive row and a negative max of an all-negative row)
    # (zeros stay zero under any s, so a zero that is its row's max or min does not pin its channel)
    holds_extreme = ((w != 0) & ((w == row_max) | (w == row_min))).any(dim=2).any(dim=0)
    scale = torch.where(holds_extreme | torch.isinf(scale), torch.ones_like(scale), scale)
    scale = scale.clamp_min(1.0)
    if max_scale is not None:
        scale = scale.clamp_max(max_scale)
    return _fit_into_rows(weight.detach(), scale)


def _fit_into_rows(weight: torch.Tensor, scale: torch.Tensor, max_iters: int = 64) -> torch.Tensor:
    """Lower s by ulps where float rounding pushed s·W one ulp past its row's max or min."""
    w = _rows(weight)
    row_max = w.amax(dim=(1, 2), keepdim=True)
    row_min = w.amin(dim=(1, 2), keepdim=True)
    one = torch.ones_like(scale)
    for _ in range(max_iters):
        dilated = w * scale.reshape(1, -1, 1)
        over = ((dilated > row_max) | (dilated < row_min)).any(dim=2).any(dim=0)
        if not over.any():
            return scale
        scale = torch.where(over, torch.nextafter(scale, one), scale)
    raise RuntimeError("Weight Dilation could not fit s into the row ranges; please report this weight")
