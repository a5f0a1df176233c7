"""Which training timesteps a sampler visits: "uniform" and the paper's "quad" spacing (docs/method.md §6).

Both return the T timesteps in descending order (the order the sampler visits them): index i of the
result is the step index i the model is told (0 = the noisiest step).
"""

from __future__ import annotations

import math

import torch

from dq.errors import UserError


def uniform_timesteps(num_steps: int, num_train_timesteps: int, offset: int = 0) -> torch.Tensor:
    """int64 [num_steps], descending: t_i = i * (num_train_timesteps // num_steps) + offset.

    The spacing of the DDIM paper's "uniform" skip and of diffusers' "leading" spacing (`offset` is the
    scheduler's `steps_offset`, 1 for Stable Diffusion).
    """
    _check_counts(num_steps, num_train_timesteps)
    stride = num_train_timesteps // num_steps
    timesteps = torch.arange(num_steps, dtype=torch.int64) * stride + offset
    if int(timesteps[-1]) >= num_train_timesteps:
        raise UserError(f"offset {offset} pushes the last timestep past {num_train_timesteps - 1}")
    return timesteps.flip(0)


def quad_timesteps(num_steps: int, num_train_timesteps: int) -> torch.Tensor:
    """int64 [num_steps], descending: round(linspace(0, sqrt(0.8 * num_train_timesteps), T)^2).

    The DDIM paper's "quad" spacing used by DilateQuant on CIFAR-10 (docs/method.md §6). For large T the
    smallest values repeat (e.g. T=100 of 1000 starts 0, 0, 0, 1, 1, ...); the repeats are kept, as in
    the reference protocol: a DDIM step from t to the same t with eta=0 leaves the sample unchanged.
    """
    _check_counts(num_steps, num_train_timesteps)
    grid = torch.linspace(0.0, math.sqrt(0.8 * num_train_timesteps), num_steps, dtype=torch.float64)
    return torch.round(grid**2).to(torch.int64).flip(0)


def sampling_timesteps(spacing: str, num_steps: int, num_train_timesteps: int, offset: int = 0) -> torch.Tensor:
    """int64 [num_steps], descending, for spacing "uniform" or "quad" (quad ignores `offset`)."""
    if spacing == "uniform":
        return uniform_timesteps(num_steps, num_train_timesteps, offset)
    if spacing == "quad":
        return quad_timesteps(num_steps, num_train_timesteps)
    raise UserError(f"spacing must be 'uniform' or 'quad', got {spacing!r}")


def _check_counts(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise UserError(f"num_steps must lie in [1, {num_train_timesteps}] (the training timesteps), got {num_steps}")
