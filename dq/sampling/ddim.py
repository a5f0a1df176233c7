"""DDIM with any step spacing: the update as a pure function, and a diffusers scheduler that uses it.

diffusers' DDIMScheduler assumes uniform spacing (its previous timestep is t - 1000 // T), so the paper's
"quad" spacing needs the previous timestep taken from the explicit timestep list instead.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from dq.errors import UserError


def ddim_update(
    sample: torch.Tensor,
    pred_original: torch.Tensor,
    pred_epsilon: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12). All tensors [B, C, H, W].

    sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev);
    x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * noise.
    `noise` is needed only when eta > 0. `sample` (x_t) only fixes the output's dtype and device.
    """
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * (1.0 - alpha_bar_t / alpha_bar_prev)
    sigma = eta * max(variance, 0.0) ** 0.5
    direction = max(1.0 - alpha_bar_prev - sigma**2, 0.0) ** 0.5 * pred_epsilon
    prev = alpha_bar_prev**0.5 * pred_original + direction
    if sigma > 0.0:
        if noise is None:
            raise UserError(f"DDIM with eta={eta} needs `noise` (the same shape as the sample)")
        prev = prev + sigma * noise
    return prev.to(dtype=sample.dtype)


class SpacedDDIMScheduler(DDIMScheduler):
    """diffusers' DDIMScheduler, driven by an explicit descending timestep list (any spacing).

    Like diffusers' multistep schedulers it counts its own steps: call `set_timesteps` before each
    trajectory, then `step` once per timestep in order.
    """

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | torch.Tensor | None = None,
    ) -> None:
        """Either `num_inference_steps` (diffusers' own spacing) or `timesteps` (int, non-increasing)."""
        if (num_inference_steps is None) == (timesteps is None):
            raise UserError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is None:
            super().set_timesteps(num_inference_steps, device=device)
        else:
            timesteps = torch.as_tensor(timesteps, dtype=torch.int64).flatten()
            num_train = self.config.num_train_timesteps
            if timesteps.numel() == 0 or int(timesteps.min()) < 0 or int(timesteps.max()) >= num_train:
                raise UserError(f"timesteps must be a non-empty list in [0, {num_train}), got {timesteps.tolist()}")
            if bool((timesteps[1:] > timesteps[:-1]).any()):
                raise UserError(f"timesteps must be in descending (sampling) order, got {timesteps.tolist()}")
            self.num_inference_steps = timesteps.numel()
            self.timesteps = timesteps.to(device) if device is not None else timesteps
        self._position = 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor]:
        """x_t [B, C, H, W] -> x_prev, moving to the next timestep of the list (the final one goes to t=-1,
        i.e. alpha_bar = final_alpha_cumprod). `variance_noise` [B, C, H, W] is used when eta > 0."""
        if generator is not None:
            raise UserError("pass per-sample `variance_noise` instead of a generator (determinism per sample)")
        position = getattr(self, "_position", None)
        if position is None or position >= len(self.timesteps):
            raise UserError(f"step called {position} times for {len(self.timesteps)} timesteps; call set_timesteps first")
        expected = int(self.timesteps[position])
        if int(timestep) != expected:
            raise UserError(f"step {position} expects timestep {expected}, got {int(timestep)}")
        prev_timestep = int(self.timesteps[position + 1]) if position + 1 < len(self.timesteps) else -1
        alpha_bar_t = float(self.alphas_cumprod[expected])
        alpha_bar_prev = float(self.alphas_cumprod[prev_timestep]) if prev_timestep >= 0 else float(self.final_alpha_cumprod)

        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original = (sample - (1 - alpha_bar_t) ** 0.5 * model_output) / alpha_bar_t**0.5
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original = model_output
            pred_epsilon = (sample - alpha_bar_t**0.5 * pred_original) / (1 - alpha_bar_t) ** 0.5
        elif prediction_type == "v_prediction":
            pred_original = alpha_bar_t**0.5 * sample - (1 - alpha_bar_t) ** 0.5 * model_output
            pred_epsilon = alpha_bar_t**0.5 * model_output + (1 - alpha_bar_t) ** 0.5 * sample
        else:
            raise UserError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")

        if self.config.thresholding:
            pred_original = self._threshold_sample(pred_original)
        elif self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original = pred_original.clamp(-limit, limit)
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_bar_t**0.5 * pred_original) / (1 - alpha_bar_t) ** 0.5

        prev_sample = ddim_update(sample, pred_original, pred_epsilon, alpha_bar_t, alpha_bar_prev, eta, variance_noise)
        self._position = position + 1
        if not return_dict:
            return (prev_sample, pred_original)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)
