"""Timestep-keyed TPQ: a student that finds its TPQ row from the timestep it is called with.

The TPQ tables are indexed by a sampling step index i (docs/method.md §3). dq's own sampler sets i before every
call (`set_step` / `step_context`), and that explicit index always wins. A stock diffusers pipeline only
passes the timestep t to `unet(x, t, ...)`; `key_by_timestep(student, timesteps, policy)` stores the trained
schedule (timesteps[i] = the timestep of step i) and installs forward hooks on the student that, when no
step index was set, look the row up from t, per sample for a batch of mixed timesteps, for the duration of
that one call. A timestep outside the trained schedule follows the policy:

- "exact" (the default): ValueError naming the timestep and the trained ones;
- "nearest": the row of the nearest trained timestep (ties: the earlier step, i.e. the larger timestep);
- "interpolate": Δ and z interpolated linearly in t between the rows of the two neighbouring trained
  timesteps (the zero point is rounded after interpolation, as every zero point is); beyond the trained
  range, the end row.

A schedule that visits one timestep at several steps (the "quad" spacing's repeated 0 at 100 steps, PLMS's
repeated second timestep) keys that timestep to its first step index.

The calls are keyed in the units the model is called with, which are not always dq's integer timesteps:
FluxPipeline passes the transformer σ = t/1000, StableDiffusion3Pipeline the unrounded σ·1000 (dq trains on
t = round(1000 σ), up to 0.5 away). `call_timesteps[i]` is what the family's stock pipeline passes at step i
of the trained schedule (`dq.sampling.pipeline_timesteps`; default: `timesteps` themselves, a UNet's); a call
matches step i when it lies within a 1e-4 of a grid step (in the call's units) plus the rounding of the
call's dtype (a bf16 pipeline's timesteps are bf16). `check_schedule` and `unmatched` take dq's own
schedules, on the integer grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dq.errors import UserError
from dq.quant.quantizers import StepBlend, StepIndexed

POLICIES = ("exact", "nearest", "interpolate")
_MATCH_TOLERANCE = 1e-4  # |t - t_i| under which a (float) timestep is the trained timestep t_i


def _float64(timesteps: Any) -> torch.Tensor:
    """float64 [N] on the CPU (a list of floats kept at double precision, not read as float32 first)."""
    if isinstance(timesteps, torch.Tensor):
        return timesteps.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)


def timestep_values(timesteps: Sequence[int | float] | torch.Tensor) -> list[int | float]:
    """Timesteps as JSON-ready numbers: ints where they are whole, floats otherwise."""
    values = _float64(timesteps).tolist()
    return [int(t) if float(t).is_integer() else float(t) for t in values]


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise UserError(f"tpq_policy must be one of {POLICIES}, got {policy!r}")
    return policy


class _Schedule:
    """The distinct values of a schedule, ascending, each with its first step index."""

    def __init__(self, values: torch.Tensor) -> None:
        unique, inverse = torch.unique(values, sorted=True, return_inverse=True)
        first = torch.full((unique.numel(),), values.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(values.numel()), reduce="amin")
        self.values, self.unique, self.first_step = values, unique, first

    def nearest(self, values: torch.Tensor) -> torch.Tensor:
        """Index into the distinct values of the nearest one (ties: the larger value, the earlier step)."""
        distance = (values[:, None] - self.unique[None, :]).abs()
        # among equal distances prefer the larger timestep (the earlier step): flip, argmin, flip back
        flipped = distance.flip(1).argmin(dim=1)
        return self.unique.numel() - 1 - flipped


class TimestepKeying:
    """The trained schedule and the policy of one student, and the forward hooks that use them.

    timesteps: dq's timestep of each trained step (the integer grid); call_timesteps: what the model is
    called with at each of those steps by the family's stock pipeline (default: timesteps)."""

    def __init__(self, timesteps: Sequence[int | float] | torch.Tensor, policy: str = "exact",
                 call_timesteps: Sequence[int | float] | torch.Tensor | None = None) -> None:
        self.policy = check_policy(policy)
        values = _float64(timesteps)
        if values.numel() == 0:
            raise UserError("the trained schedule needs at least one timestep")
        calls = values if call_timesteps is None else _float64(call_timesteps)
        if calls.shape != values.shape:
            raise UserError(f"{calls.numel()} call timesteps given for a trained schedule of {values.numel()} steps")
        if bool(((calls[1:] - calls[:-1]) * (values[1:] - values[:-1]) < 0).any()):
            raise UserError("the call timesteps must run in the order of the trained schedule (one unit per step)")
        self.timesteps, self.call_timesteps = values, calls
        self._grid, self._calls = _Schedule(values), _Schedule(calls)
        # 1e-4 of a grid step in the call's units (Flux: σ = t/1000, so 1e-7)
        peak = float(values.abs().max())
        self._call_tolerance = _MATCH_TOLERANCE * (float(calls.abs().max()) / peak if peak > 0 else 1.0)
        self._quantizers: list[StepIndexed] = []
        self._owns_step = False
        self._handles: list[Any] = []

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    def timestep_list(self) -> list[int | float]:
        return timestep_values(self.timesteps)

    def call_timestep_list(self) -> list[int | float]:
        """What the model is called with at each trained step, in its pipeline's units."""
        return timestep_values(self.call_timesteps)

    def matches(self, timesteps: Sequence[int | float] | torch.Tensor) -> bool:
        """True when `timesteps` (dq's grid) is the trained schedule itself (same steps, same order)."""
        other = _float64(timesteps)
        return other.shape == self.timesteps.shape and bool(((other - self.timesteps).abs() <= _MATCH_TOLERANCE).all())

    def unmatched(self, timesteps: torch.Tensor) -> list[int | float]:
        """The values of `timesteps` (dq's grid) that are not trained timesteps."""
        values = _float64(timesteps)
        index = self._grid.nearest(values)
        far = (self._grid.unique[index] - values).abs() > _MATCH_TOLERANCE
        return sorted(set(timestep_values(values[far])), reverse=True)

    def check_schedule(self, timesteps: Sequence[int | float] | torch.Tensor) -> None:
        """ValueError, before any sampling, when the policy is "exact" and `timesteps` leaves the trained schedule."""
        if self.policy == "exact":
            missing = self.unmatched(timesteps)
            if missing:
                raise UserError(self._refusal(missing, self.timestep_list()))

    def _refusal(self, missing: list[int | float], trained: list[int | float]) -> str:
        shown = ", ".join(f"{t:.6g}" if isinstance(t, float) else str(t) for t in missing[:8])
        shown += ", ..." if len(missing) > 8 else ""
        listed = [round(t, 6) if isinstance(t, float) else t for t in trained]
        return (f"timestep(s) {shown} are not in the schedule this student's TPQ tables were trained for "
                f"({self.num_steps} steps: {listed}); sample with that schedule, or load the student "
                "with tpq_policy='nearest' or 'interpolate'")

    # ------------------------------------------------------------------ lookup

    def resolve(self, timestep: Any) -> int | torch.Tensor | StepBlend:
        """The step index (or blend) for the timestep(s) of one call, in the call's units (`call_timesteps`):
        an int when the whole batch shares one row, an int64 tensor [B] of per-sample indices, or a
        StepBlend (policy "interpolate")."""
        given = torch.as_tensor(timestep).detach()
        values = given.reshape(-1).to(torch.float64).cpu()
        if values.numel() == 0:
            raise UserError("the model was called with an empty timestep tensor")
        if bool((values == values[0]).all()):
            values = values[:1]
        schedule = self._calls
        index = schedule.nearest(values)
        nearest = schedule.unique[index]
        # the call's own rounding: a float16 / bfloat16 pipeline passes its timesteps in that dtype
        rounding = torch.finfo(given.dtype).eps * nearest.abs() if given.is_floating_point() else 0.0
        exact = (nearest - values).abs() <= self._call_tolerance + rounding
        if self.policy == "exact" and not bool(exact.all()):
            missing = sorted(set(timestep_values(values[~exact])), reverse=True)
            raise UserError(self._refusal(missing, self.call_timestep_list()))
        if self.policy == "interpolate" and not bool(exact.all()):
            return self._blend(values, index, exact)
        steps = schedule.first_step[index]
        return int(steps[0]) if steps.numel() == 1 else steps

    def _blend(self, values: torch.Tensor, nearest: torch.Tensor, exact: torch.Tensor) -> StepBlend | int | torch.Tensor:
        unique, first_step = self._calls.unique, self._calls.first_step
        upper = torch.searchsorted(unique, values, right=False).clamp(max=unique.numel() - 1)  # first >= t
        lower = (upper - 1).clamp(min=0)
        inside = (values > unique[0]) & (values < unique[-1]) & ~exact
        t_hi, t_lo = unique[upper], unique[lower]
        # the earlier step (larger timestep t_hi) is the blend's start; weight moves toward t_lo as t falls
        weight = torch.where(inside, (t_hi - values) / (t_hi - t_lo).clamp_min(1e-12), torch.zeros_like(values))
        start = torch.where(inside, upper, nearest)
        end = torch.where(inside, lower, nearest)
        return StepBlend(first_step[start], first_step[end], weight.to(torch.float32))

    # ------------------------------------------------------------------ hooks

    def attach(self, model: nn.Module) -> None:
        self._quantizers = [m for m in model.modules() if isinstance(m, StepIndexed)]
        if not self._quantizers:
            raise UserError(f"{type(model).__name__} has no TPQ tables to key by timestep (is it a dq student?)")
        tables = {q.num_steps for q in self._quantizers}
        if tables != {self.num_steps}:
            raise UserError(f"{self.num_steps} trained timesteps given for TPQ tables of {sorted(tables)} sampling steps")
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._owns_step = False
        if self._quantizers[0].step is not None:  # an explicit step index (dq's sampler, BKD) wins
            return
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is None:
            raise UserError("this student keys its TPQ tables by timestep, but it was called without one")
        step = self.resolve(timestep)
        device = self._quantizers[0].step_to_group.device
        if isinstance(step, (torch.Tensor, StepBlend)):
            step = step.to(device)
        for quantizer in self._quantizers:
            quantizer.step = step
        self._owns_step = True

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._owns_step:
            for quantizer in self._quantizers:
                quantizer.step = None
            self._owns_step = False


def timestep_keying(model: nn.Module) -> TimestepKeying | None:
    """The TimestepKeying installed by `key_by_timestep` on `model`, or else on a module inside it (the model
    that a wrapper such as `dq.export.compile_int_model`'s holds), or None."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, TimestepKeying):
                return owner
    return None


def key_by_timestep(model: nn.Module, timesteps: Sequence[int | float] | torch.Tensor, policy: str = "exact",
                    call_timesteps: Sequence[int | float] | torch.Tensor | None = None) -> TimestepKeying:
    """Key the TPQ tables of `model` (a dq student or integer model) by timestep: `timesteps[i]` is the
    timestep of step index i in the trained schedule (call order), `call_timesteps[i]` what the model is
    called with at that step in its stock pipeline's units (default: timesteps; `dq.sampling.
    pipeline_timesteps` gives them). Replaces an earlier keying; returns it."""
    keying = TimestepKeying(timesteps, policy, call_timesteps)
    old = timestep_keying(model)
    if old is not None:
        old.detach()
    keying.attach(model)
    return keying
