"""Block-wise Knowledge Distillation (docs/method.md §4): blocks in execution order, the BlockDistiller
LightningModule (FP teacher + quantized student, which runs the block lifecycle), and the callbacks that
observe it."""

from dq.bkd.blocks import candidate_blocks, capture_block, check_block_order, execution_order
from dq.bkd.callbacks import BlockCheckpoint, BlockProgressBar, TPQRangeLogger
from dq.bkd.distiller import (
    BlockDistiller,
    BlockState,
    DistillConfig,
    choose_cache_device,
    training_blocks,
)
from dq.bkd.schedule import GROUP_SCHEDULES, TimestepGroupSchedule, batch_indices

__all__ = [
    "BlockCheckpoint",
    "BlockDistiller",
    "BlockProgressBar",
    "BlockState",
    "DistillConfig",
    "GROUP_SCHEDULES",
    "TPQRangeLogger",
    "TimestepGroupSchedule",
    "batch_indices",
    "candidate_blocks",
    "capture_block",
    "check_block_order",
    "choose_cache_device",
    "execution_order",
    "training_blocks",
]
