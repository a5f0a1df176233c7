"""The flow-matching Euler sampler of rectified-flow transformers (SD3, Flux, Sana).

The model predicts the velocity v = noise - x_0 of the straight path x_σ = (1 - σ) x_0 + σ noise, and one
Euler step goes from σ_i to σ_{i+1}:  x ← x + (σ_{i+1} - σ_i) v.  The T noise levels are those of diffusers'
FlowMatchEulerDiscreteScheduler as the Flux pipeline sets them ("uniform" spacing): s_i = linspace(1, 1/T, T), shifted by
σ = shift·s / (1 + (shift - 1)·s) (shift from the sampler config, else the scheduler config's `shift` or
`flow_shift`; a dynamic-shift config has no fixed shift: give exp(mu) of your resolution), then σ_T = 0.
With "scheduler" spacing the levels are those FlowMatchEulerDiscreteScheduler.set_timesteps(T) gives by
itself (linspace from σ_max to the shifted σ_min, then shifted), as StableDiffusion3Pipeline and
SanaPipeline step through them.

dq's timesteps are integers on the 1000-point training grid (calibration tuples, TPQ tables and timestep
keying all take int64): t_i = round(1000 σ_i), and the sampler then uses σ_i = t_i / 1000 for both the model
input and the update, so it is exact for the levels it uses; they differ from diffusers' unrounded ones
(`levels`: what a stock pipeline passes, `dq.sampling.pipeline_timesteps`) by at most 0.0005 in σ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dq.errors import UserError


class FlowEulerScheduler:
    """Euler steps of a flow-matching model over T levels (see the module doc). The subset of a diffusers
    scheduler's interface that dq's denoising loop uses: timesteps, init_noise_sigma, scale_model_input, step."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler_config: Mapping[str, Any], num_steps: int, shift: float | None = None,
                 spacing: str = "uniform") -> None:
        num_train = int(scheduler_config.get("num_train_timesteps", 1000))
        if shift is None:
            if scheduler_config.get("use_dynamic_shifting", False):
                raise UserError(
                    "this scheduler config shifts its noise levels by the image size (use_dynamic_shifting, as "
                    "Flux does); give the sampler a fixed shift (sampler.shift = exp(mu) for your resolution)"
                )
            # FlowMatchEulerDiscreteScheduler's `shift`, or a flow DPM-Solver's `flow_shift` (Sana's repo)
            shift = float(scheduler_config.get("shift", scheduler_config.get("flow_shift", 1.0)))
        if not shift > 0.0:
            raise UserError(f"the flow sampler's shift must be > 0, got {shift!r}")
        if spacing == "scheduler":  # FlowMatchEulerDiscreteScheduler's own levels (SD3's, Sana's pipelines)
            from diffusers import FlowMatchEulerDiscreteScheduler

            reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train, shift=shift)
            reference.set_timesteps(num_steps)
            sigmas = reference.sigmas[:-1].to(torch.float64)
        else:
            s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
            sigmas = shift * s / (1.0 + (shift - 1.0) * s)
        timesteps = torch.round(sigmas * num_train).to(torch.int64)
        if bool((timesteps[1:] >= timesteps[:-1]).any()) or int(timesteps[-1]) < 1:
            raise UserError(f"{num_steps} flow steps with shift {shift} do not give distinct timesteps on the "
                            f"{num_train}-point grid: {timesteps.tolist()}")
        self.num_train_timesteps = num_train
        self.levels = sigmas  # float64 [T]: the unrounded levels, those diffusers' pipelines step through
        self.timesteps = timesteps
        self.sigmas = torch.cat([timesteps.to(torch.float64) / num_train, torch.zeros(1, dtype=torch.float64)])
        self.config = {"num_train_timesteps": num_train, "shift": shift}

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, return_dict: bool = False
             ) -> tuple[torch.Tensor]:
        """x + (σ_next - σ) v for the level of `timestep` (one of self.timesteps)."""
        index = (self.timesteps == int(timestep)).nonzero()
        if index.numel() != 1:
            raise UserError(f"timestep {timestep} is not one of this flow schedule's {self.timesteps.tolist()}")
        i = int(index)
        delta = float(self.sigmas[i + 1] - self.sigmas[i])
        return (sample + delta * model_output.to(sample.dtype),)
