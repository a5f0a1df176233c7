"""Block-wise Knowledge Distillation (METHOD.md §4): blocks in execution order, the BlockDistiller
LightningModule (FP teacher + quantized student), and the BKD and TPQ callbacks that drive it."""

from dq.bkd.blocks import BLOCK_TYPES, candidate_blocks, capture_block, execution_order
from dq.bkd.callbacks import BlockScheduleCallback, TemporalGroupCallback
from dq.bkd.distiller import BlockDistiller, BlockState, DistillConfig, batch_indices, choose_cache_device

__all__ = [
    "BLOCK_TYPES",
    "BlockDistiller",
    "BlockScheduleCallback",
    "BlockState",
    "DistillConfig",
    "TemporalGroupCallback",
    "batch_indices",
    "candidate_blocks",
    "capture_block",
    "choose_cache_device",
    "execution_order",
]
