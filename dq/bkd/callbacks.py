"""The two callbacks that drive DilateQuant training.

- BlockScheduleCallback (BKD): one epoch per block. At the start of block k it builds the block's cached
  inputs (student path) and targets (teacher path), initialises its quantizers (WD was applied when the
  student was built; the TPQ tables come from the cached inputs, per group) and its optimizer; at the end it
  freezes the block and records its final loss.
- TemporalGroupCallback (TPQ): checks the student's TPQ tables and the calibration step indices against the
  sampler schedule, and logs the per-group activation ranges of each finished block. (Each forward sets
  its own step indices with `dq.quant.step_context`: the training step from its batch's rows, capture and
  initialisation from theirs, the sampler per model call.)
- BlockCheckpoint: the run's resume point, last.ckpt.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch

from dq.bkd.distiller import BlockDistiller
from dq.errors import UserError
from dq.quant import TemporalActQuantizer, act_quantizers


class BlockScheduleCallback(L.Callback):
    """Advance the BKD block cursor: one epoch per block, prepared at its start, frozen at its end."""

    def __init__(self) -> None:
        self.seconds_preparing: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        if trainer.max_epochs is None or trainer.max_epochs > len(pl_module.blocks):  # fewer: a partial run (bench)
            raise UserError(f"the trainer runs {trainer.max_epochs} epochs but the student has {len(pl_module.blocks)} blocks")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        self._begin(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: BlockDistiller, batch, batch_idx: int) -> None:
        if pl_module.cache is None:  # resumed mid-block: Lightning does not rerun on_train_epoch_start
            self._begin(trainer, pl_module)

    def _begin(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        start = time.perf_counter()
        pl_module.begin_block(trainer.current_epoch)
        self.seconds_preparing[pl_module.blocks[trainer.current_epoch] or "model"] = time.perf_counter() - start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        if pl_module.state.iteration < pl_module.distill.iters_per_block:
            return  # the epoch was cut short (max_steps, interrupt): the block is not finished
        name = pl_module.blocks[pl_module.state.block] or "model"
        pl_module.end_block()
        if name in pl_module.state.final_losses:
            pl_module.log("bkd/final_loss", pl_module.state.final_losses[name], on_epoch=True)


class TemporalGroupCallback(L.Callback):
    """TPQ checks at the start of training; per-group range logging at the end of each block."""

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps

    def on_fit_start(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        quantizers = act_quantizers(pl_module.student)
        if quantizers and quantizers[0].num_steps != self.num_steps:
            raise UserError(
                f"the student's TPQ tables serve {quantizers[0].num_steps} steps but the sampler makes {self.num_steps}"
            )
        steps = pl_module.calibration["step"]
        if int(steps.min()) < 0 or int(steps.max()) >= self.num_steps:
            raise UserError(f"calibration step indices must lie in [0, {self.num_steps}), got [{int(steps.min())}, {int(steps.max())}]")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        if pl_module.state.block == trainer.current_epoch:  # block not finished (cut short)
            return
        block = pl_module.block_module(pl_module.blocks[trainer.current_epoch])
        for name, module in block.named_modules():
            if isinstance(module, TemporalActQuantizer):
                lo, hi = group_ranges(module)
                prefix = f"tpq/{pl_module.blocks[trainer.current_epoch] or 'model'}.{name}"
                pl_module.log(f"{prefix}/range_min_mean", float(lo.mean()), on_epoch=True)
                pl_module.log(f"{prefix}/range_max_mean", float(hi.mean()), on_epoch=True)


class BlockCheckpoint(L.Callback):
    """`<dirpath>/last.ckpt`, the resume point of a run: every `every_n_steps` iterations inside a block, and
    after each block is finished (registered after BlockScheduleCallback, so the block is frozen and the
    cursor moved on when it is written). Never at a block's last iteration: a checkpoint there would make
    Lightning restart in the next epoch before the block is finished. Written beside its target and renamed
    into place: a run killed while saving keeps the previous checkpoint whole."""

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise UserError(f"checkpoint every_n_steps must be >= 1, got {every_n_steps}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: BlockDistiller, outputs, batch, batch_idx: int) -> None:
        iteration = pl_module.state.iteration
        if iteration % self.every_n_steps == 0 and iteration < pl_module.distill.iters_per_block:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        if pl_module.state.block > trainer.current_epoch:  # the block is finished (not cut short)
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        staging = self.path.with_name(self.path.name + ".tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(staging, weights_only=False)  # written by rank 0, with a barrier
        if trainer.is_global_zero:
            os.replace(staging, self.path)


def group_ranges(quantizer: TemporalActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The real-valued range [lo, hi] covered by each group's grid: [G], [G]."""
    scale = quantizer.scale.detach()
    zero_point = quantizer.zero_point.detach().round()
    return -zero_point * scale, (2**quantizer.bits - 1 - zero_point) * scale


class BlockProgressBar(L.pytorch.callbacks.TQDMProgressBar):
    """Lightning's progress bar, labelled with the BKD block instead of the epoch number."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        k, total = trainer.current_epoch, len(pl_module.blocks)
        self.train_progress_bar.set_description(f"BKD block {k + 1}/{total} {pl_module.blocks[k] or 'model'}")
