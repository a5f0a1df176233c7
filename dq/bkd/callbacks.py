"""The callbacks of a DilateQuant training run. They observe; the BKD lifecycle itself (block preparation,
the per-batch TPQ step indices, freezing a finished block) is BlockDistiller's own.

- TPQRangeLogger: the per-group activation ranges of each finished block.
- BlockCheckpoint: the run's resume point, last.ckpt.
- BlockProgressBar: Lightning's progress bar, labelled with the block.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from dq.bkd.distiller import BlockDistiller
from dq.errors import UserError
from dq.quant import TemporalActQuantizer, TokenActQuantizer


class TPQRangeLogger(L.Callback):
    """Logs the per-group activation ranges of each finished block (`tpq/<block>.<quantizer>/range_*_mean`)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        k = trainer.current_epoch
        if not pl_module.block_finished(k):  # cut short
            return
        block = pl_module.block_module(pl_module.blocks[k])
        for name, module in block.named_modules():
            if isinstance(module, TokenActQuantizer):  # its table holds clip ratios, its ranges are per token
                pl_module.log(f"tpq/{pl_module.blocks[k] or 'model'}.{name}/clip_ratio_mean",
                              float(module.scale.detach().mean()), on_epoch=True)
            elif isinstance(module, TemporalActQuantizer):
                lo, hi = group_ranges(module)
                prefix = f"tpq/{pl_module.blocks[k] or 'model'}.{name}"
                pl_module.log(f"{prefix}/range_min_mean", float(lo.mean()), on_epoch=True)
                pl_module.log(f"{prefix}/range_max_mean", float(hi.mean()), on_epoch=True)


class BlockCheckpoint(Checkpoint):
    """`<dirpath>/last.ckpt`, the resume point of a run: every `every_n_steps` iterations inside a block, and
    after each block is finished (a Lightning Checkpoint: its epoch-end hook runs after the module's, which
    freezes the block and moves the cursor on). Never at a block's last iteration: a checkpoint there would make
    Lightning restart in the next epoch before the block is finished. Written beside its target and renamed
    into place: a run killed while saving keeps the previous checkpoint whole."""

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise UserError(f"checkpoint every_n_steps must be >= 1, got {every_n_steps}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: BlockDistiller, outputs, batch, batch_idx: int) -> None:
        iteration = pl_module.state.iteration
        if iteration % self.every_n_steps == 0 and iteration < pl_module.block_iters(pl_module.state.block):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: BlockDistiller) -> None:
        if pl_module.state.block > trainer.current_epoch:  # the block is finished and ended (not cut short)
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
