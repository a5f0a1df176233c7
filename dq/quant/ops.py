"""Pure quantization math on tensors (docs/method.md §1, eqs 1-4). No modules, no state.

Asymmetric uniform fake quantization with straight-through rounding:

    q(x; Δ, z, b) = Δ · ( clamp( round(x/Δ) + z, 0, 2^b − 1 ) − z )

Δ (scale) and z (zero point) are float tensors that broadcast against x; they are learnable: gradients
reach Δ through the LSQ form of the STE and z through a straight-through round of z.
"""

from __future__ import annotations

import math

import torch

from dq.errors import UserError

_EPS = 1e-8


def qmax(bits: int) -> int:
    """Largest integer code of an unsigned b-bit grid: 2^b − 1."""
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise UserError(f"bits must be an int in [1, 16], got {bits!r}")
    return 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by `factor` (LSQ gradient scaling)."""
    return x * factor + (x - x * factor).detach()


def lsq_grad_factor(num_elements: int, bits: int) -> float:
    """LSQ's step-size gradient scale 1/sqrt(N · Q_max) for N quantized elements per step size."""
    return 1.0 / math.sqrt(max(num_elements, 1) * qmax(bits))


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
) -> torch.Tensor:
    """Fake-quantize x (eq. 1-2). scale, zero_point broadcast against x; scale > 0.

    Gradients: d/dx is 1 inside the grid and 0 where clamped; d/dΔ is LSQ's (round(x/Δ) − x/Δ inside,
    the clamp bound − z outside); d/dz is 0 inside and −Δ where clamped.
    """
    top = qmax(bits)
    z = round_ste(zero_point)
    codes = torch.clamp(round_ste(x / scale) + z, 0, top)
    return (codes - z) * scale


def token_qparams(x: torch.Tensor, ratio: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (Δ, z) [..., 1] of x [..., C]: each row's range [min(x, 0), max(x, 0)] mapped onto the grid
    0..2^b−1 (z rounded), Δ then shrunk by the clip ratio (broadcasting against x's leading axes). Statistics
    of x: no gradient flows through the min and max, only through `ratio`."""
    top = qmax(bits)
    lo, hi = torch.aminmax(x.detach(), dim=-1, keepdim=True)
    span = (hi.clamp_min(0) - lo.clamp_max(0)).clamp_min(_EPS)
    zero_point = torch.round(-lo.clamp_max(0) * top / span)
    return (ratio * span / top).clamp_min(_EPS), zero_point


def channel_view(param: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector [C] so it broadcasts along `axis` of an ndim-dim tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def fake_quantize_per_channel(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, axis: int = 0
) -> torch.Tensor:
    """Per-channel fake quantization: scale, zero_point [C] with C = x.shape[axis] (weights: axis 0)."""
    if scale.shape != (x.shape[axis],) or zero_point.shape != scale.shape:
        raise UserError(
            f"per-channel qparams must have shape [{x.shape[axis]}] for axis {axis} of {tuple(x.shape)}, "
            f"got scale {tuple(scale.shape)}, zero_point {tuple(zero_point.shape)}"
        )
    return fake_quantize(
        x, channel_view(scale, x.ndim, axis), channel_view(zero_point, x.ndim, axis), bits
    )


def gather_per_sample(table: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample parameters for a mixed-step batch (TPQ's parallel training, eq. 14).

    table: [G] one value per timestep group; rows: [B] int64 group of each sample; x: [B·k, ...] where
    k ≥ 1 copies of each sample are laid out sample-major, as the (batch·heads, …) layout of attention
    and the doubled classifier-free-guidance batch are. Returns [B·k, 1, ..., 1], broadcastable to x.
    """
    batch = rows.shape[0]
    if batch == 0 or x.shape[0] % batch:
        raise UserError(
            f"tensor batch {x.shape[0]} is not a multiple of the {batch} per-sample step indices"
        )
    values = table.index_select(0, rows)
    repeats = x.shape[0] // batch
    if repeats > 1:
        values = values.repeat_interleave(repeats)
    return values.reshape([-1] + [1] * (x.ndim - 1))


def fake_quantize_per_sample(
    x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, rows: torch.Tensor, bits: int
) -> torch.Tensor:
    """Fake-quantize each sample of x with the row of its timestep group (tables [G], rows [B])."""
    return fake_quantize(
        x, gather_per_sample(scales, rows, x), gather_per_sample(zero_points, rows, x), bits
    )


# ---------------------------------------------------------------- initialisation of (Δ, z)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric (Δ, z) that map [lo, hi] onto the grid 0..2^b−1 (eq. 3-4).

    The range is widened to include 0 so that zero (padding, ReLU/SiLU floors) is exactly representable.
    Works elementwise on tensors of any shape; returns float tensors of the same shape.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax(bits)).clamp_min(_EPS)
    zero_point = torch.round(-lo / scale).clamp(0, qmax(bits))
    return scale, zero_point


def percentile_range(x: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) = the (100−p)-th and p-th percentiles of all elements of x, p in (50, 100]."""
    if not 50.0 < percentile <= 100.0:
        raise UserError(f"percentile must be in (50, 100], got {percentile}")
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise UserError("cannot take percentiles of an empty tensor")
    k_hi = max(1, min(flat.numel(), round(percentile / 100.0 * flat.numel())))
    k_lo = max(1, flat.numel() - k_hi + 1)
    return flat.kthvalue(k_lo).values, flat.kthvalue(k_hi).values


def mse_search_range(
    x: torch.Tensor, bits: int, axis: int | None = None, grid: int = 80, norm: float = 2.0,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) minimising the Lp quantization error over shrunk min-max ranges α·[min, max].

    axis=None: one range for the whole tensor (returns 0-dim tensors); axis=k: one per slice along k
    (returns [x.shape[k]] tensors), searched independently per channel. α runs over (0, 1] in `grid` steps.
    bounds: the (min, max) to shrink from when x is a sample of a larger tensor whose exact range is known
    (an observer's streaming min/max); default x's own min/max.
    """
    data = x.detach().float()
    if axis is None:
        data = data.reshape(1, -1)
    else:
        data = data.movedim(axis, 0).reshape(data.shape[axis], -1)
    lo0, hi0 = data.amin(dim=1), data.amax(dim=1)
    if bounds is not None:
        lo0 = torch.as_tensor(bounds[0], dtype=lo0.dtype, device=lo0.device).reshape(lo0.shape)
        hi0 = torch.as_tensor(bounds[1], dtype=hi0.dtype, device=hi0.device).reshape(hi0.shape)
    best_err = torch.full_like(lo0, float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(grid):
        alpha = 1.0 - i / grid
        lo, hi = lo0 * alpha, hi0 * alpha
        scale, zp = qparams_from_range(lo, hi, bits)
        err = (fake_quantize(data, scale[:, None], zp[:, None], bits) - data).abs().pow(norm).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    if axis is None:
        return best_lo[0], best_hi[0]
    return best_lo, best_hi


def step_groups(num_steps: int, num_groups: int) -> torch.Tensor:
    """Map each sampling step index i in [0, T) to a TPQ group g(i) in [0, G) (eq. 13).

    G = T gives one group per step (the paper); G < T groups contiguous steps, as evenly as possible.
    Returns an int64 tensor [T].
    """
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= num_groups <= num_steps:
        raise UserError(f"num_groups must be in [1, num_steps={num_steps}], got {num_groups}")
    return torch.div(torch.arange(num_steps) * num_groups, num_steps, rounding_mode="floor")
