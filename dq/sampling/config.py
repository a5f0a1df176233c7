"""The sampler's settings, as the model configs (conf/model/*.yaml, key `sampler`) write them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dq.config_values import known_fields
from dq.errors import UserError

SAMPLER_NAMES = ("ddim", "plms", "pndm", "dpm_solver", "flow_euler")
SPACINGS = ("uniform", "quad", "scheduler")


@dataclass(frozen=True)
class SamplerConfig:
    """name: "ddim" (any eta, any spacing), "plms" (diffusers PNDMScheduler with skip_prk_steps, as Stable
    Diffusion uses it), "pndm" (PNDM with its Runge-Kutta warm-up) or "dpm_solver" (diffusers
    DPMSolverMultistepScheduler with the model's scheduler config) or "flow_euler" (the Euler sampler of
    flow-matching models, SD3 / Flux / Sana: dq.sampling.flow).
    num_steps: the sampler's step count T (PLMS makes T+1 model calls: see `planned_timesteps`).
    eta: DDIM's noise scale (0 = deterministic); must be 0 for the other samplers.
    spacing: "uniform" or "quad" (docs/method.md §6), or "scheduler": the timesteps the model's scheduler
      config spaces itself (its timestep_spacing and steps_offset, e.g. PixArt's DPM-Solver "linspace", which
      starts at 999) for ddim and dpm_solver, FlowMatchEulerDiscreteScheduler's own levels for flow_euler
      (SD3's and Sana's pipelines); PLMS/PNDM support "uniform" only.
    guidance_scale: classifier-free guidance scale; None (or 1.0) runs the conditional model alone.
    shift: flow_euler's noise-level shift (None: the scheduler config's); must be None for the others.
    """

    name: str = "ddim"
    num_steps: int = 25
    eta: float = 0.0
    spacing: str = "quad"
    guidance_scale: float | None = None
    shift: float | None = None

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_NAMES:
            raise UserError(f"sampler name must be one of {SAMPLER_NAMES}, got {self.name!r}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise UserError(f"sampler num_steps must be a positive int, got {self.num_steps!r}")
        if self.spacing not in SPACINGS:
            raise UserError(f"sampler spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise UserError(f"sampler eta must lie in [0, 1], got {self.eta!r}")
        if self.eta != 0.0 and self.name != "ddim":
            raise UserError(f"eta applies to the ddim sampler only; sampler {self.name!r} needs eta=0, got {self.eta}")
        if self.spacing == "scheduler" and self.name not in ("ddim", "dpm_solver", "flow_euler"):
            raise UserError(f"spacing 'scheduler' applies to the ddim, dpm_solver and flow_euler samplers, not "
                            f"{self.name!r}")
        if self.spacing != "uniform" and self.name in ("plms", "pndm"):
            raise UserError(f"sampler {self.name!r} supports spacing 'uniform' only, got {self.spacing!r}")
        if self.name == "flow_euler" and self.spacing not in ("uniform", "scheduler"):
            raise UserError(f"sampler 'flow_euler' spaces its noise levels uniformly (Flux) or as its scheduler "
                            f"does (SD3, Sana), then shifts them; set spacing: uniform or scheduler, got {self.spacing!r}")
        if self.shift is not None and (self.name != "flow_euler" or not float(self.shift) > 0.0):
            raise UserError(f"shift applies to the flow_euler sampler only and must be > 0, got {self.shift!r} "
                            f"for sampler {self.name!r}")
        if self.guidance_scale is not None and float(self.guidance_scale) < 0.0:
            raise UserError(f"guidance_scale must be >= 0 or None, got {self.guidance_scale!r}")

    @property
    def uses_guidance(self) -> bool:
        """True when each model call runs a doubled batch (unconditional + conditional)."""
        return self.guidance_scale is not None and float(self.guidance_scale) != 1.0

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> SamplerConfig:
        """Build from a dict or an OmegaConf node; unknown keys are an error (a typo would go unnoticed)."""
        values = known_fields(cls, mapping, "sampler setting(s)")
        if "eta" in values:
            values["eta"] = float(values["eta"])
        for key in ("guidance_scale", "shift"):
            if values.get(key) is not None:
                values[key] = float(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict; `shift` only when set (so keys recorded before it existed still match)."""
        values = dataclasses.asdict(self)
        if values["shift"] is None:
            del values["shift"]
        return values
