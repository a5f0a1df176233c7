"""The TPQ timestep-group schedule (dq.bkd.schedule): the default draws exactly the batches BKD drew before
schedules existed, "balanced" gives every group its share of each batch, and the distiller's batches follow
the callback."""

import lightning as L
import pytest
import torch

from dq.bkd import BlockDistiller, DistillConfig, TimestepGroupSchedule, batch_indices
from dq.bkd.schedule import balanced_indices, rows_of_groups
from dq.errors import UserError
from dq.quant import QuantConfig, step_groups
from tests.quant.conftest import tiny_unet2d

T, N = 4, 48


def _legacy_batch_indices(seed: int, block: int, iteration: int, num_samples: int, batch_size: int) -> torch.Tensor:
    """BKD's batch rows as they were drawn before schedules existed (written out here, not imported)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + block) * 1_000_003 + iteration)
    return torch.randint(num_samples, (batch_size,), generator=generator)


def test_uniform_schedule_draws_the_batches_bkd_drew_before_bitwise():
    schedule = TimestepGroupSchedule("uniform", seed=7)
    steps = torch.arange(5120) % 25
    schedule.bind(steps, step_groups(25, 25))
    for block in (0, 3, 21):
        for iteration in (0, 1, 479):
            expected = _legacy_batch_indices(7, block, iteration, 5120, 32)
            assert torch.equal(schedule.rows(block, iteration, 32), expected)
            assert torch.equal(batch_indices(7, block, iteration, 5120, 32), expected)


def test_balanced_schedule_gives_every_group_its_share_of_each_batch():
    steps = torch.arange(N) % T
    groups = step_groups(T, T)
    by_group = rows_of_groups(steps, groups)
    for iteration in range(20):
        rows = balanced_indices(0, 1, iteration, by_group, 10)  # 10 rows over 4 groups: 2 or 3 each
        counts = torch.bincount(groups[steps[rows]], minlength=T)
        assert counts.sum() == 10 and counts.min() == 2 and counts.max() == 3
        assert torch.equal(rows, balanced_indices(0, 1, iteration, by_group, 10))  # a pure function
    # over many batches the remainder rotates: every group gets the extra row sometimes
    extra = torch.zeros(T)
    for iteration in range(200):
        rows = balanced_indices(0, 0, iteration, by_group, 10)
        extra += torch.bincount(groups[steps[rows]], minlength=T) == 3
    assert extra.min() > 20
    # uniform batches of the same size do not keep the groups level
    uniform = [torch.bincount(groups[steps[batch_indices(0, 0, i, N, 10)]], minlength=T) for i in range(50)]
    assert max(int(c.max() - c.min()) for c in uniform) > 1


def test_grouped_steps_balance_groups_not_steps():
    steps = torch.arange(60) % 6
    groups = step_groups(6, 2)  # steps 0-2 -> group 0, 3-5 -> group 1
    rows = balanced_indices(3, 0, 0, rows_of_groups(steps, groups), 16)
    assert torch.bincount(groups[steps[rows]], minlength=2).tolist() == [8, 8]


def test_bad_schedules_are_refused():
    with pytest.raises(UserError, match="group_schedule must be one of uniform, balanced"):
        DistillConfig(group_schedule="round_robin")
    with pytest.raises(UserError, match=r"TPQ group\(s\) \[3\] have no calibration tuple"):
        rows_of_groups(torch.tensor([0, 1, 2, 2]), step_groups(4, 4))


def _calibration() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    step = torch.arange(N) % T
    return {"x_t": torch.randn(N, 3, 8, 8, generator=g), "step": step,
            "timestep": torch.tensor([900, 600, 300, 50])[step]}


class _BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((pl_module.state.block, pl_module.state.iteration, batch["index"].clone(),
                             batch["step"].clone()))


@pytest.mark.parametrize("name", ["uniform", "balanced"])
def test_the_distillers_batches_follow_the_schedule_callback(name):
    distill = DistillConfig(iters_per_block=2, batch_size=8, capture_batch_size=16, end_to_end_iters=0,
                            group_schedule=name)
    distiller = BlockDistiller(tiny_unet2d(), QuantConfig(num_steps=T, num_groups=T), distill, _calibration(), seed=3)
    recorder = _BatchRecorder()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, callbacks=[recorder], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        reload_dataloaders_every_n_epochs=1)
    trainer.fit(distiller)
    schedules = [c for c in trainer.callbacks if isinstance(c, TimestepGroupSchedule)]
    assert len(schedules) == 1 and schedules[0] is distiller.group_schedule and schedules[0].name == name
    assert [(b, i) for b, i, _, _ in recorder.batches] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    steps = _calibration()["step"]
    by_group = rows_of_groups(steps, step_groups(T, T))
    for block, iteration, rows, batch_steps in recorder.batches:
        expected = (_legacy_batch_indices(3, block, iteration, N, 8) if name == "uniform"
                    else balanced_indices(3, block, iteration, by_group, 8))
        assert torch.equal(rows, expected)
        assert torch.equal(batch_steps, steps[rows])
