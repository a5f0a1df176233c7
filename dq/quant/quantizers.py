"""Quantizer modules: they hold (Δ, z) as parameters and call the pure functions of `dq.quant.ops`.

- WeightQuantizer: per-output-channel (Δ_w, z_w) [C_out] (docs/method.md §1).
- TemporalActQuantizer: the Temporal Parallel Quantizer (§3, eqs 13-14): tables Δ_x[G], z_x[G] and a
  step→group map [T]. The sampling step index is set from outside (`dq.quant.set_step`), never counted
  inside forward: an int selects one row for the whole batch (sampling), an int64 tensor [B] selects one
  row per sample (parallel training on mixed-step batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dq.errors import UserError
from dq.quant import ops

# per group, the most activation values an observer keeps for percentile / MSE initialisation
MAX_OBSERVED_VALUES = 1 << 16
# the smallest step size Δ training may leave (the floor of initialisation too: ops.qparams_from_range)
MIN_STEP_SIZE = ops._EPS


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric fake quantizer of a weight [O, ...] with learnable Δ_w, z_w [O].

    centred: z_w fixed at 2^(b−1) (a buffer, not trained), so q_w − z_w always lies in [−2^(b−1), 2^(b−1) − 1]:
    8-bit weights then fit int8 as they are, and the integer kernels need no shift correction
    (QuantConfig.weight_zero_point "centred")."""

    def __init__(self, out_channels: int, bits: int, lsq_grad_scale: bool = False, centred: bool = False) -> None:
        super().__init__()
        ops.qmax(bits)  # validates bits
        self.bits = bits
        self.lsq_grad_scale = lsq_grad_scale
        self.centred = centred
        self.scale = nn.Parameter(torch.ones(out_channels))
        if centred:
            self.register_buffer("zero_point", torch.full((out_channels,), float(2 ** (bits - 1))))
        else:
            self.zero_point = nn.Parameter(torch.zeros(out_channels))
        self.enabled = True

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, method: str = "minmax") -> None:
        """Set (Δ_w, z_w) from the weight's per-out-channel min-max range or an MSE search over it."""
        if method == "minmax":
            flat = weight.detach().reshape(weight.shape[0], -1)
            lo, hi = flat.amin(dim=1), flat.amax(dim=1)
        elif method == "mse":
            lo, hi = ops.mse_search_range(weight, self.bits, axis=0)
        else:
            raise UserError(f"weight init method must be 'minmax' or 'mse', got {method!r}")
        if self.centred:  # the grid [−z·Δ, (qmax − z)·Δ] around 0 must hold the range
            zero = self.zero_point
            scale = torch.maximum(-lo.clamp_max(0) / zero, hi.clamp_min(0) / (ops.qmax(self.bits) - zero))
            self.scale.copy_(scale.clamp_min(MIN_STEP_SIZE))
            return
        scale, zero_point = ops.qparams_from_range(lo, hi, self.bits)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        scale, zero_point = self.scale, self.zero_point
        if self.lsq_grad_scale:
            factor = ops.lsq_grad_factor(weight[0].numel(), self.bits)
            scale = ops.scale_grad(scale, factor)
            zero_point = zero_point if self.centred else ops.scale_grad(zero_point, factor)
        return ops.fake_quantize_per_channel(weight, scale, zero_point, self.bits, axis=0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}" + (", centred" if self.centred else "")


class _RangeObserver:
    """Per group, the exact running min/max of everything seen and a uniform random sample (a reservoir)
    of at most MAX_OBSERVED_VALUES values, for initialising TPQ tables.

    The sample is uniform over all values seen, whatever the chunking: when a chunk of m values arrives
    after n, the number c of its values that enter a full reservoir of K is drawn from the hypergeometric
    law (K draws from n + m, m of them new), c random kept values are dropped and c random values of the
    chunk join. A random subset of a uniform sample is uniform, so every K-subset of the n + m values is
    equally likely, as in one subsample of the whole stream."""

    def __init__(self, num_groups: int, keep_values: bool, generator_seed: int = 0) -> None:
        self.lo: list[torch.Tensor | None] = [None] * num_groups
        self.hi: list[torch.Tensor | None] = [None] * num_groups
        self.values: list[torch.Tensor | None] = [None] * num_groups
        self.seen = [0] * num_groups
        self.keep_values = keep_values
        self.rng = np.random.default_rng(generator_seed)

    def update(self, group: int, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1)
        if x.numel() == 0:
            return
        lo, hi = x.min(), x.max()
        self.lo[group] = lo if self.lo[group] is None else torch.minimum(self.lo[group], lo)
        self.hi[group] = hi if self.hi[group] is None else torch.maximum(self.hi[group], hi)
        if self.keep_values:
            self.values[group] = self._sample(self.values[group], self.seen[group], x)
        self.seen[group] += x.numel()

    def _pick(self, population: int, count: int) -> torch.Tensor:
        """`count` distinct random indices below `population` (O(count) for a large population)."""
        return torch.from_numpy(self.rng.choice(population, size=count, replace=False))

    def _sample(self, kept: torch.Tensor | None, seen: int, new: torch.Tensor) -> torch.Tensor:
        """A uniform sample of the seen values plus `new`, from `kept` (a uniform sample of the seen)."""
        size = MAX_OBSERVED_VALUES
        if kept is None or seen + new.numel() <= size or kept.numel() < size:
            pool = new.cpu() if kept is None else torch.cat([kept, new.cpu()])
            return pool if pool.numel() <= size else pool[self._pick(pool.numel(), size)]
        if max(seen, new.numel()) < 10**9:  # numpy's limit for the exact law
            entering = int(self.rng.hypergeometric(new.numel(), seen, size))
        else:  # its binomial limit, exact to O(K / n) at that size
            entering = int(self.rng.binomial(size, new.numel() / (seen + new.numel())))
        if entering == 0:
            return kept
        kept = kept.clone()
        kept[self._pick(size, entering)] = new[self._pick(new.numel(), entering).to(new.device)].cpu()
        return kept


def _proportional_sample(samples: list[torch.Tensor], seen: list[int], size: int, rng) -> torch.Tensor:
    """One sample of at most `size` values from per-process uniform samples of their streams (`seen` values
    each): each contributes in proportion to its stream, so the result is a sample of all streams together."""
    total = sum(seen)
    if sum(s.numel() for s in samples) <= size:
        return torch.cat([s.cpu() for s in samples])
    counts = [min(s.numel(), round(size * n / total)) for s, n in zip(samples, seen)]
    return torch.cat([s.cpu()[torch.from_numpy(np.sort(rng.choice(s.numel(), size=c, replace=False)))]
                      for s, c in zip(samples, counts)])


@dataclass(frozen=True)
class StepBlend:
    """A step "between" trained steps (`dq.quant.timesteps`, policy "interpolate"): per row r, the TPQ table
    value (1 − weight[r]) · table[group(start[r])] + weight[r] · table[group(end[r])]. Rows: 1 for a whole
    batch, or one per sample. start, end: int64 [R] step indices; weight: float32 [R] in [0, 1]."""

    start: torch.Tensor
    end: torch.Tensor
    weight: torch.Tensor

    def to(self, device: torch.device | str) -> StepBlend:
        return StepBlend(self.start.to(device), self.end.to(device), self.weight.to(device))


class StepIndexed(nn.Module):
    """A module with a step→group map that reads the sampling step index set from outside (`set_step`).

    The base of every module that holds per-step tables: the trainable TemporalActQuantizer and the
    integer runtime's quantizers (`dq.export`), so the sampler's step plumbing drives both alike.
    """

    def __init__(self, num_steps: int, num_groups: int) -> None:
        super().__init__()
        self.register_buffer("step_to_group", ops.step_groups(num_steps, num_groups))
        self.step: int | torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.step_to_group.numel()

    def group_rows(self, batch: int | None = None) -> torch.Tensor:
        """The group index of each sample: [1] for an int step, [B] for per-sample steps."""
        step = self.step
        if step is None:
            raise RuntimeError(
                "no sampling step index is set on this activation quantizer: call "
                "dq.quant.set_step(model, i) (or pass per-sample indices) before the forward pass"
            )
        if isinstance(step, StepBlend):
            raise RuntimeError(
                "an interpolated step (timestep-keyed TPQ, policy 'interpolate') has no single group; "
                "set an explicit step index for calibration and training"
            )
        if isinstance(step, int):
            return self.step_to_group[step : step + 1]
        return self.step_to_group.index_select(0, step)

    def blended_rows(self, table: torch.Tensor) -> torch.Tensor:
        """[R]: the table value of each row for the current StepBlend (differentiable in `table`)."""
        step = self.step
        start = table.index_select(0, self.step_to_group.index_select(0, step.start))
        end = table.index_select(0, self.step_to_group.index_select(0, step.end))
        return torch.lerp(start, end, step.weight.to(table.dtype))

    def fake_quantize_step(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
                           ) -> torch.Tensor:
        """Fake-quantize x with the current step's row(s) of the tables scale, zero_point [G]: one row for
        the batch, one per sample, or rows interpolated for a StepBlend (z is rounded after the blend)."""
        if isinstance(self.step, StepBlend):
            scale, zero_point = self.blended_rows(scale), self.blended_rows(zero_point)
            rows = torch.arange(scale.numel(), device=scale.device)
        else:
            rows = self.group_rows()
        if rows.numel() == 1:  # index_select, not scale[rows[0]]: a 0-dim index is read on the host (a sync)
            return ops.fake_quantize(x, scale.index_select(0, rows), zero_point.index_select(0, rows), bits)
        return ops.fake_quantize_per_sample(x, scale, zero_point, rows, bits)


class TemporalActQuantizer(StepIndexed):
    """Per-tensor activation quantizer with one (Δ, z) per timestep group (TPQ, eqs 13-14).

    Inputs are laid out [B·k, ...] where B is the number of step indices set (1 for an int step) and k ≥ 1
    copies per sample come sample-major (attention's batch·heads layout, the doubled CFG batch).
    """

    def __init__(
        self,
        bits: int,
        num_steps: int,
        num_groups: int,
        init_method: str = "minmax",
        percentile: float = 99.99,
        lsq_grad_scale: bool = False,
    ) -> None:
        super().__init__(num_steps, num_groups)
        ops.qmax(bits)
        self.bits = bits
        self.init_method = init_method
        self.percentile = percentile
        self.lsq_grad_scale = lsq_grad_scale
        self.scale = nn.Parameter(torch.ones(num_groups))
        self.zero_point = nn.Parameter(torch.zeros(num_groups))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.enabled = True
        self._observer: _RangeObserver | None = None
        self._checked_calibrated = False
        # activation drop during training (set by dq.quant.activation_drop): each element passes unquantized
        # with probability drop_prob, its mask drawn from drop_generator
        self.drop_prob = 0.0
        self.drop_generator: torch.Generator | None = None

    @property
    def num_groups(self) -> int:
        return self.scale.numel()

    # ------------------------------------------------------------------ calibration

    def start_observing(self, seed: int = 0) -> None:
        """Record per-group statistics of the inputs (passed through unquantized) until finish_observing."""
        self._observer = _RangeObserver(self.num_groups, self.init_method != "minmax", seed)

    @property
    def observing(self) -> bool:
        """Whether forward passes are being recorded (between start_observing and finish_observing)."""
        return self._observer is not None

    def cancel_observing(self) -> None:
        """Stop observing and leave the tables as they were (calibration interrupted by an error)."""
        self._observer = None

    @torch.no_grad()
    def merge_observed(self, gather, seed: int) -> None:
        """Make what this quantizer observed that of all processes (each saw its share of the calibration
        rows), before finish_observing: per group the min and max of every process's (exact), and for the
        search-based inits a sample of the processes' samples together, at most MAX_OBSERVED_VALUES values
        drawn in proportion to what each saw, the same on every process. gather(obj) -> [obj of each process]."""
        obs = self._observer
        device = next((t.device for t in obs.lo if t is not None), torch.device("cpu"))

        def host(t):
            return None if t is None else t.cpu()

        states = gather([(host(obs.lo[g]), host(obs.hi[g]), obs.values[g], obs.seen[g]) for g in range(self.num_groups)])
        rng = np.random.default_rng(seed)
        for g in range(self.num_groups):
            parts = [state[g] for state in states if state[g][0] is not None]
            if not parts:
                continue
            obs.lo[g] = torch.stack([p[0] for p in parts]).min().to(device)
            obs.hi[g] = torch.stack([p[1] for p in parts]).max().to(device)
            obs.seen[g] = sum(p[3] for p in parts)
            if obs.keep_values:
                obs.values[g] = _proportional_sample([p[2] for p in parts], [p[3] for p in parts],
                                                     MAX_OBSERVED_VALUES, rng)

    @torch.no_grad()
    def finish_observing(self) -> list[int]:
        """Set each group's (Δ, z) from what was observed. Groups that saw no data copy the nearest group
        that did. Returns the indices of those borrowed groups."""
        obs = self._observer
        if obs is None:
            raise RuntimeError("finish_observing called without start_observing")
        self._observer = None
        seen = [g for g in range(self.num_groups) if obs.lo[g] is not None]
        if not seen:
            raise RuntimeError(
                "this activation quantizer saw no data during calibration: is the layer reached by the "
                "calibration forward passes, and was a step index set?"
            )
        lo_all, hi_all = [], []
        for g in range(self.num_groups):
            if obs.lo[g] is None:
                continue
            if self.init_method == "minmax":
                lo, hi = obs.lo[g], obs.hi[g]
            elif self.init_method == "percentile":
                lo, hi = ops.percentile_range(obs.values[g], self.percentile)
            elif self.init_method == "mse":
                lo, hi = ops.mse_search_range(obs.values[g], self.bits, grid=50, bounds=(obs.lo[g], obs.hi[g]))
            else:
                raise UserError(f"unknown activation init method {self.init_method!r}")
            lo_all.append(lo.reshape(()))
            hi_all.append(hi.reshape(()))
        scale, zero_point = ops.qparams_from_range(torch.stack(lo_all), torch.stack(hi_all), self.bits)
        seen_t = torch.tensor(seen)
        nearest = (torch.arange(self.num_groups)[:, None] - seen_t[None, :]).abs().argmin(dim=1)
        self.scale.copy_(scale[nearest].to(self.scale))
        self.zero_point.copy_(zero_point[nearest].to(self.zero_point))
        self.calibrated.fill_(True)
        self._checked_calibrated = False
        return [g for g in range(self.num_groups) if obs.lo[g] is None]

    def _observe(self, x: torch.Tensor) -> None:
        rows = self.group_rows()
        if rows.numel() == 1:
            self._observer.update(int(rows), x)
            return
        if x.shape[0] % rows.numel():
            raise UserError(f"tensor batch {x.shape[0]} is not a multiple of {rows.numel()} step indices")
        per_row = rows.repeat_interleave(x.shape[0] // rows.numel())
        for g in per_row.unique().tolist():
            self._observer.update(g, x[per_row == g])

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, numel_per_sample: int | None = None) -> torch.Tensor:
        """Observing (between start_observing and finish_observing): record x, return it unchanged. Disabled
        (set_quant_enabled): x. Otherwise x fake-quantized with its step's group (Δ, z); the first such call
        after calibration or a state load checks, once, that the tables were initialised (checking every
        call would make each forward wait on the device). numel_per_sample: the elements per sample of the
        whole tensor when x is a slice of it (tiled attention), for the LSQ gradient scale; None: x[0]'s."""
        if self._observer is not None:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        if not self._checked_calibrated:
            if not bool(self.calibrated):
                raise RuntimeError(
                    "activation quantizer used before calibration: initialise its TPQ tables from "
                    "calibration data (dq.quant.calibrate_activations) or load a saved quant state"
                )
            self._checked_calibrated = True
        scale, zero_point = self.scale, self.zero_point
        if self.lsq_grad_scale:
            factor = ops.lsq_grad_factor(numel_per_sample or x[0].numel(), self.bits)
            scale, zero_point = ops.scale_grad(scale, factor), ops.scale_grad(zero_point, factor)
        quantized = self.fake_quantize_step(x, scale, zero_point, self.bits)
        if self.drop_prob > 0.0:
            keep_float = torch.rand(x.shape, generator=self.drop_generator, device=x.device) < self.drop_prob
            return torch.where(keep_float, x, quantized)
        return quantized

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._checked_calibrated = False
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.num_groups}, steps={self.num_steps}"


# tokens per group a per-token quantizer keeps during calibration for its clip-ratio search: 4,096, and at most
# 8 MiB of values (Flux's 3,072 channels: 682 tokens)
MAX_OBSERVED_TOKENS = 4096
MAX_OBSERVED_TOKEN_VALUES = 1 << 21
# clip ratios the calibration search tries, from 1 (the token's min-max range) down to this
MIN_CLIP_RATIO = 0.5


class TokenActQuantizer(TemporalActQuantizer):
    """Per-token dynamic activation quantizer of a Linear input [..., C] (quant.act_granularity=token).

    Each token (each row over the last axis) gets its own asymmetric grid at run time, from its own min and
    max shrunk by a learned clip ratio α: Δ = α·(max − min)/(2^b − 1), z = round(−min·(2^b − 1)/(max − min)).
    TPQ keeps its role: α is the table, one ratio per timestep group (`scale` [G]; its Adam rate is
    relative, as every Δ's). Calibration sets each group's α by an MSE search over sampled tokens;
    BKD then trains it through the LSQ gradient of Δ. The min and max are statistics of the input (no
    gradient flows through them; the input's own gradient is the straight-through one). `zero_point` is an
    unused buffer, kept so every activation quantizer has the same tensors."""

    def __init__(self, bits: int, num_steps: int, num_groups: int, lsq_grad_scale: bool = False) -> None:
        super().__init__(bits, num_steps, num_groups, init_method="mse", lsq_grad_scale=lsq_grad_scale)
        del self.zero_point
        self.register_buffer("zero_point", torch.zeros(num_groups))
        self._tokens: list[torch.Tensor | None] | None = None

    def start_observing(self, seed: int = 0) -> None:
        self._observer = _RangeObserver(self.num_groups, False, seed)  # its seeded subsampling only
        self._tokens = [None] * self.num_groups

    def cancel_observing(self) -> None:
        super().cancel_observing()
        self._tokens = None

    @torch.no_grad()
    def merge_observed(self, gather, seed: int) -> None:
        """As TemporalActQuantizer.merge_observed, for the tokens kept per group: the processes' together, at
        most the limit a process keeps, the same on every process."""
        states = gather(self._tokens)
        rng = np.random.default_rng(seed)
        for g in range(self.num_groups):
            parts = [state[g] for state in states if state[g] is not None]
            if not parts:
                continue
            pool = torch.cat(parts)
            limit = max(1, min(MAX_OBSERVED_TOKENS, MAX_OBSERVED_TOKEN_VALUES // pool.shape[-1]))
            self._tokens[g] = pool if pool.shape[0] <= limit else pool[torch.from_numpy(
                np.sort(rng.choice(pool.shape[0], size=limit, replace=False)))]

    def _observe(self, x: torch.Tensor) -> None:
        rows = self.group_rows()
        per_row = rows.expand(x.shape[0]) if rows.numel() == 1 else rows.repeat_interleave(x.shape[0] // rows.numel())
        for g in per_row.unique().tolist():
            tokens = x[per_row == g].detach().float().reshape(-1, x.shape[-1]).cpu()
            kept = self._tokens[g]
            pool = tokens if kept is None else torch.cat([kept, tokens])
            limit = max(1, min(MAX_OBSERVED_TOKENS, MAX_OBSERVED_TOKEN_VALUES // x.shape[-1]))
            if pool.shape[0] > limit:  # a random subset of the kept and the new (seeded)
                pool = pool[self._observer._pick(pool.shape[0], limit)]
            self._tokens[g] = pool

    @torch.no_grad()
    def finish_observing(self) -> list[int]:
        tokens, self._tokens = self._tokens, None
        if tokens is None:
            raise RuntimeError("finish_observing called without start_observing")
        self._observer = None
        seen = [g for g in range(self.num_groups) if tokens[g] is not None]
        if not seen:
            raise RuntimeError(
                "this activation quantizer saw no data during calibration: is the layer reached by the "
                "calibration forward passes, and was a step index set?"
            )
        ratios = torch.linspace(1.0, MIN_CLIP_RATIO, 26)
        best = []
        for g in seen:
            errors = [float((self._quantize(tokens[g], torch.tensor([r])) - tokens[g]).pow(2).mean()) for r in ratios]
            best.append(ratios[int(torch.tensor(errors).argmin())])
        nearest = (torch.arange(self.num_groups)[:, None] - torch.tensor(seen)[None, :]).abs().argmin(dim=1)
        self.scale.copy_(torch.stack(best)[nearest].to(self.scale))
        self.calibrated.fill_(True)
        self._checked_calibrated = False
        return [g for g in range(self.num_groups) if tokens[g] is None]

    def _quantize(self, x: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """x fake-quantized per token, ratio broadcasting against x's leading axes ([1] or [B·k, 1, …])."""
        return ops.fake_quantize(x, *ops.token_qparams(x, ratio, self.bits), self.bits)

    def fake_quantize_step(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int
                           ) -> torch.Tensor:
        if isinstance(self.step, StepBlend):
            ratio = self.blended_rows(scale)
            if ratio.numel() > 1:
                ratio = ops.gather_per_sample(ratio, torch.arange(ratio.numel(), device=ratio.device), x)
        else:
            rows = self.group_rows()
            ratio = scale.index_select(0, rows) if rows.numel() == 1 else ops.gather_per_sample(scale, rows, x)
        return self._quantize(x, ratio)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per token, groups={self.num_groups}, steps={self.num_steps}"
