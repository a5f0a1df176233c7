"""Which TPQ timestep groups BKD's batches draw, and in what proportion: the schedule of timestep groups.

The Temporal Parallel Quantizer trains the activation tables of every group at once ("in parallel"): each
batch mixes calibration rows of all sampling steps, and every row updates the table row of its own group
(docs/method.md, TPQ). What a schedule decides is how the rows of a batch are spread over the groups:

- "uniform" (the default, the paper's): rows drawn uniformly from all N calibration tuples, so each group's
  share of a batch follows its share of the tuples. The rows are `batch_indices(seed, block, iteration)`,
  exactly as BKD drew them before schedules existed.
- "balanced": every group gets the same number of rows in each batch (⌊B/G⌋, the remainder going to groups
  picked at random without repeats), each row uniform within its group. Same expectation as "uniform"
  when the tuples cover the steps evenly; less variance in each group's share.

Rows are a pure function of (seed, block, iteration) under every schedule, so a resumed run draws the
batches it had left. The schedule is a Lightning callback (`TimestepGroupSchedule`) that the distiller
declares in `configure_callbacks`; the distiller's batch loader asks it for each batch's rows.
"""

from __future__ import annotations

import lightning as L
import torch

from dq.errors import UserError

GROUP_SCHEDULES = ("uniform", "balanced")


def batch_indices(seed: int, block: int, iteration: int, num_samples: int, batch_size: int) -> torch.Tensor:
    """The calibration rows of one BKD iteration under "uniform": int64 [batch_size], a pure function of
    its arguments."""
    return torch.randint(num_samples, (batch_size,), generator=_generator(seed, block, iteration))


def balanced_indices(seed: int, block: int, iteration: int, rows_by_group: list[torch.Tensor],
                     batch_size: int) -> torch.Tensor:
    """The calibration rows of one BKD iteration under "balanced": int64 [batch_size], ⌊B/G⌋ rows of every
    group (rows_by_group[g]: the calibration rows of group g) plus one row of each of B mod G groups picked
    at random; within a group, rows uniform with replacement. Ordered by group, then by draw."""
    groups = len(rows_by_group)
    generator = _generator(seed, block, iteration)
    counts = torch.full((groups,), batch_size // groups, dtype=torch.int64)
    counts[torch.randperm(groups, generator=generator)[: batch_size % groups]] += 1
    picked = []
    for rows, count in zip(rows_by_group, counts.tolist(), strict=True):
        if count:
            picked.append(rows[torch.randint(rows.numel(), (count,), generator=generator)])
    return torch.cat(picked)


def rows_of_groups(steps: torch.Tensor, step_to_group: torch.Tensor) -> list[torch.Tensor]:
    """Per TPQ group g, the calibration rows whose step falls in g: G int64 tensors. A group with no row
    is an error naming it (its table row could never be trained under a balanced schedule)."""
    groups = step_to_group[steps]
    out = [torch.nonzero(groups == g).flatten() for g in range(int(step_to_group.max()) + 1)]
    empty = [g for g, rows in enumerate(out) if rows.numel() == 0]
    if empty:
        raise UserError(f"TPQ group(s) {empty} have no calibration tuple: raise data.num_samples or use "
                        "method.distill.group_schedule=uniform")
    return out


def _generator(seed: int, block: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + block) * 1_000_003 + iteration)


def check_group_schedule(name: str) -> str:
    if name not in GROUP_SCHEDULES:
        raise UserError(f"method.distill.group_schedule must be one of {', '.join(GROUP_SCHEDULES)}, got {name!r}")
    return name


class TimestepGroupSchedule(L.Callback):
    """The TPQ timestep-group schedule of a BKD run, as a Lightning callback: at the start of each block
    (epoch) it takes the calibration rows of each group from the distiller, and the distiller's batch loader
    asks it for the rows of every iteration (`rows`). State: none beyond its arguments; rows depend only on
    (seed, block, iteration)."""

    def __init__(self, name: str = "uniform", seed: int = 0) -> None:
        self.name = check_group_schedule(name)
        self.seed = seed
        self._rows_by_group: list[torch.Tensor] | None = None
        self._num_samples = 0

    def bind(self, steps: torch.Tensor, step_to_group: torch.Tensor) -> None:
        """The calibration tuples' step indices [N] and the TPQ step→group map [T]."""
        self._num_samples = int(steps.numel())
        self._rows_by_group = rows_of_groups(steps.cpu(), step_to_group.cpu()) if self.name == "balanced" else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.group_schedule = self

    def rows(self, block: int, iteration: int, batch_size: int) -> torch.Tensor:
        """The calibration rows of iteration `iteration` of block `block`: int64 [batch_size]."""
        if self._num_samples == 0:
            raise RuntimeError("TimestepGroupSchedule.rows before bind(): the distiller binds it in begin_block")
        if self.name == "uniform":
            return batch_indices(self.seed, block, iteration, self._num_samples, batch_size)
        return balanced_indices(self.seed, block, iteration, self._rows_by_group, batch_size)
