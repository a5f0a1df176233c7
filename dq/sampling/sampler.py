"""The one denoising loop: FP teacher and quantized student alike, any supported diffusers scheduler.

Before every model call the loop tells the model its step index i (0 = the noisiest step) through
`dq.quant.step_context`, which the TPQ quantizers of a student read (docs/method.md §3); with classifier-free
guidance the doubled batch (unconditional + conditional) shares that index. A student keyed by timestep
(`dq.quant.key_by_timestep`) sampled with another schedule than its trained one gets no step index: it
finds its rows from the timesteps under its policy (nearest / interpolate; "exact" refuses before
sampling). Every random draw of sample k comes from its own generator seeded by `sample_seed(seed, k)`, so
batching and sharding never change an image.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from tqdm.auto import tqdm

from dq.arch import cond_kwargs, model_call, sample_shape
from dq.arch.flow_transformers import timestep_input_scale
from dq.errors import UserError
from dq.io import derived_seed
from dq.quant import key_by_timestep, step_context, timestep_keying, tpq_num_steps
from dq.sampling.config import SamplerConfig
from dq.sampling.ddim import SpacedDDIMScheduler
from dq.sampling.flow import FlowEulerScheduler
from dq.sampling.spacing import sampling_timesteps

# on_step(step_index, timestep, x_t [B, C, H, W] (the model input), sample_indices int64 [B])
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`'s generator: a hash of (seed, index), so distinct pairs never share one."""
    return derived_seed("dq-sample", int(seed), int(index))


def build_scheduler(scheduler_config: Mapping[str, Any], sampler: SamplerConfig) -> SchedulerMixin | FlowEulerScheduler:
    """A fresh diffusers scheduler for `sampler`, built from the model's (training) scheduler config, with
    its timesteps set. Schedulers keep per-trajectory state, so build one per batch."""
    config = dict(scheduler_config)
    num_train = int(config.get("num_train_timesteps", 1000))
    offset = int(config.get("steps_offset", 0))
    if sampler.name == "ddim":
        scheduler = SpacedDDIMScheduler.from_config(config)
        if sampler.spacing == "scheduler":  # the config's own timestep_spacing
            scheduler.set_timesteps(sampler.num_steps)
        else:
            scheduler.set_timesteps(timesteps=sampling_timesteps(sampler.spacing, sampler.num_steps, num_train,
                                                                 offset))
    elif sampler.name in ("plms", "pndm"):
        # "uniform" is diffusers' "leading" spacing: t_i = i * (N // T) + steps_offset
        scheduler = PNDMScheduler.from_config(
            config, skip_prk_steps=sampler.name == "plms", timestep_spacing="leading"
        )
        scheduler.set_timesteps(sampler.num_steps)
    elif sampler.name == "dpm_solver":
        scheduler = DPMSolverMultistepScheduler.from_config(config)
        if sampler.spacing == "scheduler":  # the config's own timestep_spacing, as the pipeline sets it
            scheduler.set_timesteps(sampler.num_steps)
        else:
            timesteps = sampling_timesteps(sampler.spacing, sampler.num_steps, num_train, offset)
            if bool((timesteps[1:] >= timesteps[:-1]).any()):
                raise UserError(
                    f"dpm_solver needs distinct timesteps; {sampler.spacing} spacing with {sampler.num_steps} "
                    f"steps repeats some: {timesteps.tolist()}"
                )
            scheduler.set_timesteps(timesteps=timesteps.tolist())
    elif sampler.name == "flow_euler":
        scheduler = FlowEulerScheduler(config, sampler.num_steps, sampler.shift, sampler.spacing)
    else:  # SamplerConfig already rejects other names
        raise UserError(f"unknown sampler {sampler.name!r}")
    return scheduler


def planned_timesteps(scheduler_config: Mapping[str, Any], sampler: SamplerConfig) -> torch.Tensor:
    """int64 [M]: the timestep of each model call of one trajectory, in call order; M is the number of step
    indices (TPQ's T). M = num_steps, except PLMS (num_steps + 1) and PNDM (its Runge-Kutta warm-up)."""
    return build_scheduler(scheduler_config, sampler).timesteps.to(torch.int64).cpu().clone()


def pipeline_timesteps(unet: nn.Module, scheduler_config: Mapping[str, Any], sampler: SamplerConfig) -> torch.Tensor:
    """float64 [M]: what the family's stock pipeline passes the denoiser as its timestep at each model call
    of this schedule (`planned_timesteps`' calls), in that pipeline's units: the integer t for the UNets
    and DiT; the unrounded σ·1000 of the flow levels for SD3 (StableDiffusion3Pipeline), σ itself for Flux
    (FluxPipeline divides by 1000), σ·1000·timestep_scale for Sana. A student keyed with these
    (`dq.quant.key_by_timestep(..., call_timesteps=)`) finds its rows in those pipelines."""
    scheduler = build_scheduler(scheduler_config, sampler)
    if isinstance(scheduler, FlowEulerScheduler):
        values = scheduler.levels * scheduler.num_train_timesteps
    else:
        values = scheduler.timesteps.to(torch.float64).cpu()
    return values * timestep_input_scale(unet)


def unet_forward(unet: nn.Module, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
    """The denoiser's prediction for x [B, C, H, W] at timesteps int64 [B]; cond: class labels int64 [B] or
    embeddings [B, L, D] (cross-attention), or None for an unconditional model. The call convention is the
    model's architecture description's (dq.arch); a diffusers UNet's by default."""
    call = model_call(unet)
    if call is not None:
        return call(unet, x, timesteps, cond)
    return unet(x, timesteps, return_dict=False, **cond_kwargs(cond))[0]


def _call_model(unet: nn.Module, x: torch.Tensor, timestep: int, cond: torch.Tensor | None) -> torch.Tensor:
    """unet_forward with one timestep for the whole batch."""
    return unet_forward(unet, x, torch.full((x.shape[0],), timestep, dtype=torch.int64, device=x.device), cond)


def predict_noise(
    unet: nn.Module,
    x: torch.Tensor,
    timestep: int,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """The model output for x [B, C, H, W], with classifier-free guidance when `guidance_scale` is set and
    not 1: one call on the doubled batch [uncond; cond], then uncond + g * (cond - uncond)."""
    if guidance_scale is None or float(guidance_scale) == 1.0:
        output = _call_model(unet, x, timestep, cond)
    else:
        if cond is None or uncond is None:
            raise UserError(f"guidance_scale={guidance_scale} needs both cond and uncond conditioning")
        both = _call_model(unet, torch.cat([x, x]), timestep, torch.cat([uncond, cond]))
        output_uncond, output_cond = both.chunk(2)
        output = output_uncond + float(guidance_scale) * (output_cond - output_uncond)
    if output.shape != x.shape:
        raise UserError(
            f"the model returned shape {tuple(output.shape)} for input {tuple(x.shape)}; the samplers need an "
            "output of the input's shape (epsilon, sample or v prediction)"
        )
    return output


def _draws_step_noise(scheduler: SchedulerMixin, sampler: SamplerConfig) -> bool:
    """Whether scheduler.step consumes fresh noise (then the loop supplies it per sample)."""
    if sampler.name == "ddim":
        return sampler.eta > 0.0
    if sampler.name == "dpm_solver":
        return str(scheduler.config.algorithm_type).startswith("sde-")
    return False


def _expand_rows(tensor: torch.Tensor | None, rows: int, name: str) -> torch.Tensor | None:
    """tensor with leading dim `rows` or 1 (broadcast) -> leading dim `rows`."""
    if tensor is None:
        return None
    if tensor.shape[0] == 1:
        return tensor.expand(rows, *tensor.shape[1:])
    if tensor.shape[0] != rows:
        raise UserError(f"{name} has {tensor.shape[0]} rows; expected 1 or {rows} (one per sample)")
    return tensor


def key_by_trained_sampler(student: nn.Module, scheduler_config: Mapping[str, Any], sampler: SamplerConfig,
                           policy: str = "exact") -> nn.Module:
    """Key a student by the timesteps of the sampler it was trained with, unless its saved state already
    recorded its schedule (files from before dq recorded it have none). Returns the student."""
    if timestep_keying(student) is None:
        key_by_timestep(student, planned_timesteps(scheduler_config, sampler), policy)
    return student


def check_student_steps(unet: nn.Module, timesteps: torch.Tensor, sampler: SamplerConfig) -> bool:
    """Whether the loop sets explicit step indices on `unet` for this schedule (timesteps int64 [M], one per
    model call): True for a float model and for a student's trained schedule; False for a student keyed by
    timestep whose policy takes this other schedule. ValueError when the student cannot run it."""
    student_steps = tpq_num_steps(unet)
    if student_steps is None:
        return True
    keying = timestep_keying(unet)
    if keying is None:
        if student_steps != len(timesteps):
            raise UserError(
                f"this quantized model's TPQ tables were built for {student_steps} sampling steps, but the "
                f"sampler {sampler.name} with num_steps={sampler.num_steps} makes {len(timesteps)} model calls "
                "per sample; sample with the schedule the model was trained for"
            )
        return True
    if keying.matches(timesteps):
        return True
    keying.check_schedule(timesteps)
    return False


@torch.no_grad()
def sample(
    unet: nn.Module,
    scheduler_config: Mapping[str, Any],
    sampler: SamplerConfig,
    num_samples: int,
    *,
    seed: int = 0,
    first_index: int = 0,
    batch_size: int = 64,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Generate samples k = first_index .. first_index + num_samples - 1 and return them, float32
    [num_samples, C, H, W] on the CPU, in the model's output space (pixels in [-1, 1], or latents).

    cond / uncond: class labels int64 [num_samples] or [1], or embeddings [num_samples or 1, L, D]; uncond
    is needed when sampler.uses_guidance. on_step is called before every model call with the model input
    (e.g. to record calibration data). The model runs on its own device and dtype; a quantized student
    must have been built for this sampler's schedule, unless it is keyed by timestep with a policy that
    takes another one (`check_student_steps`).
    """
    if num_samples < 1 or batch_size < 1:
        raise UserError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    if sampler.uses_guidance and (cond is None or uncond is None):
        raise UserError(f"sampler guidance_scale={sampler.guidance_scale} needs cond and uncond conditioning")
    cond = _expand_rows(cond, num_samples, "cond")
    uncond = _expand_rows(uncond, num_samples, "uncond")
    device = _float_tensor(unet).device
    shape = sample_shape(unet)
    timesteps = planned_timesteps(scheduler_config, sampler)
    explicit_steps = check_student_steps(unet, timesteps, sampler)

    outputs = []
    num_batches = -(-num_samples // batch_size)
    with tqdm(total=num_batches * len(timesteps), desc=f"{sampler.name} sampling", disable=not progress) as bar:
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            indices = torch.arange(first_index + start, first_index + stop, dtype=torch.int64)
            generators = [torch.Generator().manual_seed(sample_seed(seed, int(k))) for k in indices]
            batch_cond = None if cond is None else cond[start:stop].to(device)
            batch_uncond = None if uncond is None else uncond[start:stop].to(device)
            x = _denoise(unet, scheduler_config, sampler, generators, shape, indices, (batch_cond, batch_uncond),
                         explicit_steps, on_step, bar)
            outputs.append(x.float().cpu())
    return torch.cat(outputs)


def _float_tensor(unet: nn.Module) -> torch.Tensor:
    """The model's first floating-point parameter, or buffer (an integer model whose float parts are all
    buffers): where and in which dtype it runs."""
    for tensor in itertools.chain(unet.parameters(), unet.buffers()):
        if tensor.is_floating_point():
            return tensor
    raise UserError(f"{type(unet).__name__} holds no floating-point tensor: dq cannot tell its device and dtype")


def _denoise(unet: nn.Module, scheduler_config: Mapping[str, Any], sampler: SamplerConfig,
             generators: list[torch.Generator], shape: tuple[int, ...], indices: torch.Tensor,
             conditioning: tuple[torch.Tensor | None, torch.Tensor | None], explicit_steps: bool,
             on_step: StepCallback | None, bar: tqdm) -> torch.Tensor:
    """One batch's denoising loop, from its per-sample noise (generators) to the final samples."""
    parameter = _float_tensor(unet)
    declared = getattr(unet, "dtype", None)  # a compiled integer model with bf16 glue takes float32
    device, dtype = parameter.device, declared if isinstance(declared, torch.dtype) else parameter.dtype
    scheduler = build_scheduler(scheduler_config, sampler)
    x = _per_sample_noise(generators, shape) * float(scheduler.init_noise_sigma)
    x = x.to(device=device, dtype=dtype)
    draws_noise = _draws_step_noise(scheduler, sampler)
    takes_eta = "eta" in inspect.signature(scheduler.step).parameters
    for step_index, timestep in enumerate(scheduler.timesteps.tolist()):
        model_input = scheduler.scale_model_input(x, timestep)
        if on_step is not None:
            on_step(step_index, int(timestep), model_input, indices)
        with step_context(unet, step_index) if explicit_steps else contextlib.nullcontext():
            output = predict_noise(unet, model_input, int(timestep), *conditioning, sampler.guidance_scale)
        step_kwargs: dict[str, Any] = {}
        if takes_eta:
            step_kwargs["eta"] = sampler.eta
        if draws_noise:
            step_kwargs["variance_noise"] = _per_sample_noise(generators, shape).to(device=device, dtype=dtype)
        x = scheduler.step(output, timestep, x, return_dict=False, **step_kwargs)[0]
        bar.update(1)
    return x


def _per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] standard normal, row b drawn from generators[b] on the CPU (device-independent)."""
    return torch.stack([torch.randn(shape, generator=generator) for generator in generators])

