"""BlockDistiller: the LightningModule of DilateQuant training (docs/method.md §4, eq. 15).

It holds the frozen FP teacher and the quantized student. Block k is trained on

    loss = MSE( B_k(fp_in_k), B̂_k(q_in_k) )

where fp_in_k is the block's input on the teacher's path and q_in_k its input on the student's path with
every earlier block already quantized and trained. One Lightning epoch is one block, and the module runs
the whole lifecycle from its own hooks: at the start of block k it caches the block's inputs (student path)
and targets (teacher path), initialises its quantizers and sets its learning rates; each training batch
carries its calibration rows and their TPQ step indices; at the end it freezes the block and records its
final loss. Callbacks only observe (progress, TPQ ranges, the resume checkpoint). Only the current block is
in the autograd graph.

The batch of iteration i of block k is a pure function of (seed, k, i), and the block cursor, the
iteration, the optimizer state and the RNG state are saved in the Lightning checkpoint, so
a run resumed mid-block continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from dq.arch import describe
from dq.bkd.blocks import (
    WHOLE_MODEL,
    BlockIO,
    BlockReplay,
    block_readers,
    candidate_blocks,
    capture_block,
    capture_outputs,
    check_block_order,
    nbytes_of,
    recomputed_blocks,
    same_block_io,
)
from dq.bkd.guidance import with_guidance_rows
from dq.bkd.schedule import TimestepGroupSchedule, check_group_schedule
from dq.bkd.store import BlockIOFiller, tier_allocator
from dq.calibration.tuples import select_rows
from dq.config_values import check_field_types
from dq.errors import UserError
from dq.placement import enter as enter_phase
from dq.quant import (
    MIN_STEP_SIZE,
    QuantConfig,
    TemporalActQuantizer,
    WeightQuantizer,
    activation_drop,
    calibrate_activations,
    drop_lowrank,
    drop_lowrank_absent,
    merge_observations,
    quantize_model,
    set_lowrank_scale,
    step_context,
    step_groups,
    tpq_num_steps,
)
from dq.resume import IDENTITY_KEY, fault_point, phase
from dq.sampling import unet_forward

log = logging.getLogger(__name__)

TEACHER_PRECISIONS = ("fp32", "bf16")
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the layers whose weights bf16 autocast runs in bfloat16 anyway: a bf16 teacher stores them so (the targets are
# bitwise the same, BlockDistiller.store_teacher_in_bf16)
BF16_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
DEFAULT_END_TO_END_ITERS = 300  # the stage's length in the recipe (W4A4 +0.9 dB over BKD alone: docs/results)
_CACHE_DEVICE = re.compile(r"cpu|auto|disk|cuda(:\d+)?")


@dataclass(frozen=True)
class DistillConfig:
    """How each block is trained. iters_per_block = 0 runs the initialisation only (PTQ).

    GPU-scale options. cache_device, replay_*, target_cache_mb change where and how often the computation
    runs, not its result; compile and micro_batch_size may change rounding (operations fused, reordered or
    summed in parts); teacher_precision="bf16" and cache_dtype="bf16" round the teacher's targets (and the
    cached inputs).

    - cache_device: where a block's cached inputs and targets live: "cpu", "cuda" / "cuda:N", "disk"
      (memory-mapped files under cache_dir, dq.bkd.store), or "auto": the tier the run's plan picked
      (`planned_tiers`), else the module's CUDA device when the cache takes at most cache_gpu_fraction of
      its free memory, else the CPU (always the CPU when the module is not on a GPU).
    - teacher_precision: "fp32", or "bf16" to compute the teacher's block targets under bfloat16 autocast
      (stored in cache_dtype; the student and the loss stay fp32), with the teacher's Linear and conv weights
      stored in bf16 during BKD (store_teacher_in_bf16: the same targets in half the memory).
    - compile: run the current block through torch.compile(mode=compile_mode, backend=compile_backend) in
      the training steps (initialisation and capture stay eager; the student's modules are not replaced).
    - target_cache_mb: one teacher pass yields the targets of as many consecutive blocks as fit in this
      many MiB of host memory (at least one block), kept until their blocks come; 0 = one pass per block.
      The targets are the same either way; fewer passes make block preparation cheaper.
    - replay_cache_mb: host memory for the blocks' outputs on the calibration tuples, carried forward to the
      blocks that read them: while a later block's inputs are captured, a trained (frozen) student block
      with a kept output returns it instead of running, and in the teacher's target passes each earlier
      teacher block returns the output its own pass kept; a prefix pass then costs little more than the
      code between blocks, and preparing a block runs one block over the N tuples, not the whole prefix. A
      value is kept until the last block that reads it (found once, by tracing a forward pass), then a
      stand-in of zeros replaces it where nothing still to run reads it (checked bitwise on each pass's
      first chunk); 0 = every prefix pass runs its blocks. The caches are the same either way.
    - replay_spill: values past replay_cache_mb go to memory-mapped files under cache_dir (dq.bkd.store),
      so that outputs are carried forward at any model size; false: they are not kept, and the blocks that
      would have returned them run.
    """

    # The defaults are the recipe conf/method/dilatequant.yaml runs (a test checks that they agree): the
    # learning rates chosen by bench/defaults_sweep.py, 480 iterations a block, then the end-to-end stage.
    iters_per_block: int = 480
    batch_size: int = 32
    lr_weights: float = 1e-4  # Adam on the raw weights (STE)
    lr_quant: float = 1e-2  # Adam on each step size Δ, relative to its magnitude (fraction of |Δ| per step)
    lr_zero_point: float = 1e-1  # Adam on zero points, in grid codes per step
    train_weights: bool = True
    min_lr_ratio: float = 0.0  # cosine decay ends at lr * min_lr_ratio
    cache_device: str = "auto"  # "cpu" | "cuda" | "cuda:N" | "disk" | "auto"
    capture_batch_size: int = 256
    whole_model: bool = False  # end-to-end QAT: the whole student is one block, distilled on the model output
    # "auto": with the run's plan, the share of the GPU a block's GPU phases with its cache may take; without
    # one, the largest share of the free GPU memory a cache may take
    cache_gpu_fraction: float = 0.5
    cache_dir: str | None = None  # disk-tier caches: memory-mapped files here (None: $DQ_CACHE_DIR/blocks)
    teacher_precision: str = "fp32"  # "fp32" | "bf16" (autocast of the teacher's target forwards)
    # the dtype block caches store the student's inputs and the teacher's targets in: "fp32", or "bf16" (half
    # the bytes; each value rounded to bfloat16 once, the block still computes in fp32)
    cache_dtype: str = "fp32"
    compile: bool = False  # torch.compile the current block for its training steps
    # each training batch in passes of this many rows, their gradients summed (the same step as one pass of the
    # batch, in less memory: activations of micro_batch_size rows); None = the batch in one pass
    micro_batch_size: int | None = None
    # the student's blocks other than the one being trained, and the teacher's blocks, in host memory (moved to
    # the device for a call): the device holds one block of each besides the caches (BlockDistiller.place_blocks)
    offload: bool = False
    compile_mode: str | None = None  # torch.compile(mode=...): None, "reduce-overhead", "max-autotune", ...
    compile_backend: str = "inductor"  # torch.compile(backend=...); "aot_eager" compiles fast (tests)
    target_cache_mb: float = 1024.0  # host memory for teacher targets captured ahead of their block
    replay_cache_mb: float = 1024.0  # host memory for blocks' outputs replayed in later passes (0: off)
    replay_spill: bool = True  # replayed outputs past replay_cache_mb in memory-mapped files under cache_dir
    act_drop: float = 0.0  # training steps: each activation element skips its quantizer with this probability
    # after the last block, the whole student distilled on the model output (eq. 15 with the model as the
    # block) for this many iterations (0 = BKD only), with learning rates of its own (same units as above);
    # None = the recipe's 300 after trained blocks, 0 when no block is trained (PTQ) or with whole_model
    end_to_end_iters: int | None = None
    end_to_end_lr_weights: float = 3e-5
    end_to_end_lr_quant: float = 3e-4
    end_to_end_lr_zero_point: float = 3e-3
    # the end-to-end stage with every block's activations recomputed in backward (activation checkpointing):
    # the stage's memory is one block's activations instead of the whole model's, for about one more forward
    # a step; the same values and gradients (refused with act_drop, whose masks a rerun would redraw)
    end_to_end_recompute: bool = False
    group_schedule: str = "uniform"  # the TPQ timestep-group schedule of the batches (dq.bkd.schedule)
    # the share of calibration rows (per sampling step) that carry the unconditional input of classifier-free
    # guidance instead of their condition, for models calibrated with guidance (dq.bkd.guidance): 0.5 is the
    # sampler's own proportion (measured on the embedded DiT: +0.16 ± 0.13 dB over conditional-only, 3
    # seeds); 0 = every row conditional (the paper). Initialisation, BKD and the end-to-end stage all see it.
    uncond_fraction: float = 0.5
    # quant.lowrank_mode "decay": the low-rank branches' weight λ falls from 1 to 0 (cosine) over this share of
    # their block's iterations; the block's remaining iterations train the quantized layers without it
    lowrank_decay_end: float = 0.75

    def __post_init__(self) -> None:
        check_field_types(self, "method.distill.")
        if self.end_to_end_iters is None:
            stage = DEFAULT_END_TO_END_ITERS if self.iters_per_block > 0 and not self.whole_model else 0
            object.__setattr__(self, "end_to_end_iters", stage)
        if self.iters_per_block < 0:
            raise UserError(f"iters_per_block must be >= 0, got {self.iters_per_block}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise UserError(f"micro_batch_size must be >= 1 (or null: the batch in one pass), got {self.micro_batch_size}")
        if self.batch_size < 1 or self.capture_batch_size < 1:
            raise UserError(f"batch sizes must be >= 1, got {self.batch_size}, {self.capture_batch_size}")
        if self.lr_weights < 0 or self.lr_quant <= 0 or self.lr_zero_point < 0:
            raise UserError(
                "learning rates must be lr_weights >= 0, lr_quant > 0, lr_zero_point >= 0; got "
                f"{self.lr_weights}, {self.lr_quant}, {self.lr_zero_point}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if not isinstance(self.cache_device, str) or not _CACHE_DEVICE.fullmatch(self.cache_device):
            raise UserError(
                f"cache_device must be 'cpu', 'auto', 'disk', 'cuda' or 'cuda:N', got {self.cache_device!r}"
            )
        if not 0.0 < self.cache_gpu_fraction <= 1.0:
            raise UserError(f"cache_gpu_fraction must lie in (0, 1], got {self.cache_gpu_fraction}")
        if not self.target_cache_mb >= 0:
            raise UserError(f"target_cache_mb must be >= 0, got {self.target_cache_mb}")
        if not self.replay_cache_mb >= 0:
            raise UserError(f"replay_cache_mb must be >= 0, got {self.replay_cache_mb}")
        if self.end_to_end_iters < 0:
            raise UserError(f"end_to_end_iters must be >= 0, got {self.end_to_end_iters}")
        if self.end_to_end_lr_weights < 0 or self.end_to_end_lr_quant <= 0 or self.end_to_end_lr_zero_point < 0:
            raise UserError(
                "end-to-end learning rates must be end_to_end_lr_weights >= 0, end_to_end_lr_quant > 0, "
                f"end_to_end_lr_zero_point >= 0; got {self.end_to_end_lr_weights}, {self.end_to_end_lr_quant}, "
                f"{self.end_to_end_lr_zero_point}"
            )
        if self.end_to_end_iters and (self.whole_model or self.iters_per_block == 0):
            raise UserError("end_to_end_iters adds an end-to-end stage after the trained blocks: it needs "
                            "iters_per_block > 0 and whole_model false (set it to 0 for PTQ and end-to-end QAT)")
        if not 0.0 <= self.act_drop < 1.0:
            raise UserError(f"act_drop must lie in [0, 1), got {self.act_drop}")
        if self.end_to_end_recompute and self.act_drop > 0:
            raise UserError("end_to_end_recompute reruns each block in backward, which would redraw act_drop's "
                            "random masks: use one of them")
        if not 0.0 <= self.uncond_fraction <= 1.0:
            raise UserError(f"uncond_fraction must lie in [0, 1], got {self.uncond_fraction}")
        if not 0.0 < self.lowrank_decay_end <= 1.0:
            raise UserError(f"lowrank_decay_end must lie in (0, 1], got {self.lowrank_decay_end}")
        check_group_schedule(self.group_schedule)
        if self.cache_dtype not in CACHE_DTYPES:
            raise UserError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            allowed = ", ".join(TEACHER_PRECISIONS)
            raise UserError(f"teacher_precision must be one of {allowed}, got {self.teacher_precision!r}")


class CalibrationSource(Protocol):
    """What BlockDistiller loads its calibration tuples from (dq.calibration.CalibrationDataModule)."""

    def load(self, device: torch.device | None = None) -> dict[str, torch.Tensor]: ...


def choose_cache_device(
    bytes_needed: int, device: torch.device | str, free_bytes: int, fraction: float
) -> torch.device:
    """Where an "auto" cache goes: `device` when it is a CUDA device and the cache's `bytes_needed` take
    at most `fraction` of its `free_bytes`, else the CPU. (The rest of the free memory is left to the
    block's training: activations, gradients, Adam state.)"""
    device = torch.device(device)
    if device.type == "cuda" and bytes_needed <= fraction * free_bytes:
        return device
    return torch.device("cpu")


def free_gpu_bytes(device: torch.device) -> int:
    """Memory a new allocation on CUDA `device` can use: what the driver reports free plus what PyTorch's
    caching allocator holds reserved but unused (the previous block's cache, for instance)."""
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@dataclass
class BlockState:
    """Progress of BKD; everything here goes into the Lightning checkpoint."""

    block: int = 0
    iteration: int = 0
    initialized: list[bool] = field(default_factory=list)
    final_losses: dict[str, float] = field(default_factory=dict)


class BlockBatches:
    """The training data of BKD: for iteration i of block k, the calibration rows the timestep-group
    schedule gives (`TimestepGroupSchedule.rows`; "uniform": batch_indices(seed, k, i)) and their TPQ step
    indices, {"index": int64 [B], "step": int64 [B]}.

    Each pass yields the current block's remaining iterations, from the cursor (a BlockState the
    distiller advances and restores from its checkpoint), so a resumed run gets exactly the batches that
    were left (rows are a pure function of seed, block and iteration)."""

    def __init__(self, steps: torch.Tensor, schedule: TimestepGroupSchedule, batch_size: int,
                 block_iters: list[int], cursor: BlockState) -> None:
        self.steps, self.schedule, self.batch_size = steps, schedule, batch_size
        self.block_iters, self.cursor = block_iters, cursor

    def __len__(self) -> int:
        # the block at the cursor: the Trainer reloads this loader every epoch (= block), so each block
        # gets its own length (BKD blocks and the end-to-end stage can differ)
        return self.block_iters[min(self.cursor.block, len(self.block_iters) - 1)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        block, start = self.cursor.block, self.cursor.iteration
        for iteration in range(start, self.block_iters[block]):
            rows = self.schedule.rows(block, iteration, self.batch_size)
            yield {"index": rows, "step": self.steps[rows]}

    # Lightning treats loaders with these as resumable; the position lives in the cursor
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def training_blocks(student: nn.Module, distill: DistillConfig) -> list[str]:
    """What the distiller trains, one Lightning epoch each: the student's blocks in execution order, then the
    whole model when there is an end-to-end stage; the whole model alone for end-to-end QAT."""
    if distill.whole_model:
        return [WHOLE_MODEL]
    return [*candidate_blocks(student), *([WHOLE_MODEL] if distill.end_to_end_iters > 0 else [])]


class BlockDistiller(L.LightningModule):
    """Teacher (frozen FP UNet) + student (quantized copy), trained block by block."""

    def __init__(
        self,
        teacher: nn.Module,
        quant_config: QuantConfig,
        distill: DistillConfig,
        calibration: Mapping[str, torch.Tensor] | CalibrationSource,
        seed: int = 0,
    ) -> None:
        """calibration: the tuples (x_t [N,C,H,W], timestep [N], step [N], optional cond [N,...]), or a source
        of them (dq.calibration.CalibrationDataModule) loaded in `setup` on every rank, once the process
        group exists under DDP, on the Trainer's device."""
        super().__init__()
        self.automatic_optimization = False
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = quantize_model(teacher, quant_config, describe(teacher)).eval().requires_grad_(True)
        self.distill = distill
        self.quant_config = quant_config
        # which TPQ groups each batch draws; a callback (configure_callbacks) that sets itself here in setup
        self.group_schedule = TimestepGroupSchedule(distill.group_schedule, seed)
        self.calibration_source = calibration
        self.calibration: dict[str, torch.Tensor] = {}
        self.num_samples = 0
        # under DDP, the calibration rows this rank caches, initialises and trains on (rows rank, rank + world,
        # ...); None: all of them (one process)
        self.local_rows: torch.Tensor | None = None
        self._teacher_fp32: dict[str, torch.Tensor] = {}  # teacher_precision bf16: fp32 weights, on the host
        self._offload_hooks: dict[tuple[int, str], list] = {}  # offload: (model, block) -> its move-in/out hooks
        self.seed = seed
        self.blocks: list[str] = []  # execution order, set in setup()
        self.state = BlockState()
        self.cache: BlockIO | None = None
        self._resume: dict[str, Any] | None = None
        self._losses: list[float] = []
        # the current block wrapped by torch.compile (distill.compile), by block name; a plain dict, so that
        # the compiled wrapper is not registered as a submodule and the state_dict keys stay the student's
        self._compiled: dict[str, nn.Module] = {}
        self._compiled_checked = False  # whether the compiled block's quantizers ran once eagerly
        self.cache_devices: dict[str, str] = {}  # where each block's cache was kept (block name -> device)
        # block name -> "cuda" | "cpu" | "disk": where the run's plan puts each cache under cache_device "auto"
        # (dq.plan; train.py sets it); a block it does not name goes to the host, then by its size
        self.planned_tiers: dict[str, str] = {}
        # wall seconds of block preparation in this process: "cache" (teacher + student prefix passes over
        # all N tuples, build_cache) and "init" (the activation quantizers' initialisation pass)
        # and "replay" (recording each trained block's outputs for the later prefix passes)
        self.prep_seconds = {"cache": 0.0, "init": 0.0, "replay": 0.0}
        self.block_prep_seconds: dict[str, float] = {}  # per block: its whole preparation (begin_block)
        self.end_to_end_seconds = 0.0  # wall seconds of the end-to-end stage in this process
        self._stage_started: float | None = None
        self._targets: dict[str, list[torch.Tensor]] = {}  # teacher targets captured ahead of their blocks
        self.replay = BlockReplay()  # trained blocks' outputs, returned in place of running them (replay_cache_mb)
        self.teacher_replay = BlockReplay()  # the teacher's block outputs, for its later target passes
        self.replay_peak = {"host": 0, "disk": 0}  # the most bytes the two replays held at once, per place
        self._readers: dict[str, frozenset[int]] = {}  # block -> positions of the blocks that read its output
        self._target_row_bytes: dict[str, int] | None = None
        # what the student depends on (dq.resume.run_identity), stored in every checkpoint; set by train.py
        self.run_identity: dict[str, Any] | None = None

    # ------------------------------------------------------------------ helpers

    def block_module(self, name: str, model: nn.Module | None = None) -> nn.Module:
        model = self.student if model is None else model
        return model if name == WHOLE_MODEL else model.get_submodule(name)

    def calibration_batch(self, rows: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        tuples = {k: v for k, v in self.calibration.items() if isinstance(v, torch.Tensor)}
        return {k: v.to(self.device) for k, v in select_rows(tuples, _host_rows(rows)).items()}

    @property
    def num_local(self) -> int:
        """The calibration rows of this rank's caches (all N in one process)."""
        return self.num_samples if self.local_rows is None else len(self.local_rows)

    def global_rows(self, rows: torch.Tensor | slice) -> torch.Tensor | slice:
        """The calibration rows of rows `rows` of this rank's caches."""
        return rows if self.local_rows is None else self.local_rows[_host_rows(rows)]

    def _world(self) -> tuple[int, int]:
        """(world size, rank) of the Trainer's processes; (1, 0) without a Trainer."""
        if self._trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def calibration_steps(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The step indices of calibration rows (rows may live on the accelerator), on the module's device."""
        return self.calibration["step"][_host_rows(rows)].to(self.device)

    @property
    def stored_dtype(self) -> torch.dtype | None:
        """The dtype a block cache stores floating-point inputs in, where it is not the captured one."""
        return None if self.distill.cache_dtype == "fp32" else CACHE_DTYPES[self.distill.cache_dtype]

    def teacher_autocast(self, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        """The context of a teacher forward that produces targets: bfloat16 autocast on the batch's device
        type with teacher_precision="bf16", none with "fp32". Never used for the student (its fake
        quantization must run in fp32)."""
        if self.distill.teacher_precision == "bf16":
            return torch.autocast(device_type=batch["x_t"].device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def build_cache(self, name: str) -> BlockIO:
        """fp targets B_k(fp_in_k) from the teacher and student inputs q_in_k, for every calibration row.

        The cache is allocated whole in its tier (`cache_tier`: the GPU, the host or disk) and each capture
        chunk, moved to the CPU as it is made (the accelerator holds one chunk at a time), is copied into its
        rows. A host cache of a run without a plan then goes where `cache_device` says; "auto" decides from
        its exact size."""
        filler = None
        step = self.distill.capture_batch_size
        standins = self.replay.standins(self.blocks, self._readers, self.state.block) if name != WHOLE_MODEL else set()
        tier = self.cache_tier(name)
        for chunk, start in enumerate(range(0, self.num_local, step)):
            batch = self.calibration_batch(self.global_rows(slice(start, start + step)))
            part = self._capture_student_inputs(name, chunk, batch, standins)
            if chunk == 0 and standins:  # the first chunk again with every stand-in block running
                check = self._capture_student_inputs(name, chunk, batch, set())
                if not same_block_io(check, part):
                    log.warning("BKD block %s: its inputs depend on blocks the forward-pass trace did not see "
                                "it read; preparing it with them running", name)
                    standins, part = set(), check
            if filler is None:  # the whole cache allocated in its tier, each chunk copied into its rows
                filler = BlockIOFiller(part, self.num_local, self.allocator(tier), self.stored_dtype)
            else:
                filler.add(part)
        log.debug("BKD block %s: prefix pass with %d blocks replayed, %d stand-ins", name or "model",
                  len(self.replay.outputs), len(standins))
        self.replay.drop_read_by(self._readers, self.state.block)  # values no block after this one reads
        cache = filler.result()
        # initialisation needs only the student's inputs: PTQ (no iterations) never asks the teacher
        cache.output = self.teacher_targets(name) if self.block_iters(self.state.block) > 0 else None
        device = self.cache_device_for(cache.nbytes) if tier == "cpu" else self.tier_device(tier)
        self.cache_devices[name] = str(device)
        # said aloud only when "auto" had to leave a GPU run's cache on the CPU (slower steps)
        spilled = self.distill.cache_device == "auto" and self.device.type == "cuda" and device.type == "cpu"
        level = logging.INFO if spilled else logging.DEBUG
        log.log(level, "BKD block %s: cache of %.1f MiB on %s", name or "model", cache.nbytes / 2**20, device)
        return cache.to(device)

    @torch.no_grad()
    def teacher_targets(self, name: str) -> list[torch.Tensor]:
        """The teacher's output tensors of block `name` for every calibration row (fp32, on the CPU), from the
        targets captured ahead (target_cache_mb) or a new teacher pass that also captures the next blocks'.
        The pass replays the earlier teacher blocks' outputs its predecessors kept (replay_cache_mb) and keeps
        those of its own blocks that a later block reads."""
        if name not in self._targets:
            names = self.target_group(name)
            targets: dict[str, list[torch.Tensor]] = {}
            step = self.distill.capture_batch_size
            replay = self.distill.replay_cache_mb > 0 and name != WHOLE_MODEL
            first, last = (self.blocks.index(names[0]), self.blocks.index(names[-1])) if replay else (0, 0)
            standins = self.teacher_replay.standins(self.blocks, self._readers, first) if replay else set()
            # the group's blocks whose outputs a block after the group reads: kept for the later passes
            carried = [n for n in names if replay and max(self._readers.get(n, frozenset()), default=-1) > last]
            kept: dict[str, list] = {n: [] for n in carried}
            shapes: dict[str, list] = {n: [] for n in names} if replay else {}
            tiers: dict[str, str | None] = {}
            starts = list(range(0, self.num_local, step))
            for chunk, start in enumerate(starts):
                batch = self.calibration_batch(self.global_rows(slice(start, start + step)))
                with self.teacher_autocast(batch):
                    if name == WHOLE_MODEL:
                        outputs = {name: capture_block(self.teacher, name, batch, want_output=True).output}
                        returned, values = {}, {}
                    else:
                        outputs, returned, values = self._teacher_pass(names, chunk, batch, standins, kept)
                        if chunk == 0 and standins:  # the first chunk again with every stand-in block running
                            check = self._teacher_pass(names, chunk, batch, set(), kept)
                            if not all(all(map(torch.equal, check[0][n], outputs[n])) for n in names):
                                log.warning("BKD: the teacher's outputs of %s depend on blocks the forward-pass "
                                            "trace did not see them read; capturing them with those running", names[0])
                                standins, (outputs, returned, values) = set(), check
                for n in shapes:
                    shapes[n].append(returned[n])
                for n in list(kept):
                    if n not in tiers:  # the first chunk is the largest: the whole value is bounded ahead
                        tiers[n] = self.replay_tier(nbytes_of(values[n]) * len(starts), values[n])
                    if tiers[n] is None:
                        del kept[n]
                    else:
                        # already a host copy (capture_outputs): kept as it is, or copied to disk
                        kept[n].append(BlockReplay.stored(values[n], self._replay_allocator(tiers[n]), copy=False))
                for n in names:  # targets in cache_dtype whatever the teacher's precision: the loss is computed in fp32
                    if n not in targets:  # allocated whole (on disk for a disk-tier block), filled chunk by chunk
                        allocate = self.allocator("disk" if self.cache_tier(n) == "disk" else "cpu")
                        targets[n] = [allocate((self.num_local, *t.shape[1:]), CACHE_DTYPES[self.distill.cache_dtype])
                                      for t in outputs[n]]
                    for full, t in zip(targets[n], outputs[n], strict=True):
                        full[start : start + t.shape[0]].copy_(t.float())
            for n in shapes:
                self.teacher_replay.record(n, shapes[n], kept.get(n), on_disk=tiers.get(n) == "disk")
            self._note_replay_peak()
            if replay:
                self.teacher_replay.drop_read_by(self._readers, last)  # values no block after the group reads
            self._targets = targets
        return self._targets.pop(name)

    def _teacher_pass(self, names: list[str], chunk: int, batch: dict[str, torch.Tensor], standins: set[str],
                      keep: Iterable[str]) -> tuple[dict[str, list[torch.Tensor]], dict[str, Any], dict[str, Any]]:
        """One teacher pass on a capture chunk up to the last of `names`, the earlier blocks replayed or stood
        in for: each block's output tensors, the shapes of what it returned, and a host copy of what the
        blocks `keep` returned."""
        with self.teacher_replay.replaying(self.teacher, chunk, batch["x_t"].device, standins):
            return capture_outputs(self.teacher, names, batch, keep=keep)

    def replay_tier(self, nbytes: int, output: Any) -> str | None:
        """Where a replayed value of `nbytes` bytes is kept: "cpu" while the host's share (replay_cache_mb,
        both replays together) holds it, else "disk" (replay_spill), else nowhere (None)."""
        if not BlockReplay.replayable(output):
            return None
        host = self.replay.host_bytes + self.teacher_replay.host_bytes
        if host + nbytes <= self.distill.replay_cache_mb * 2**20:
            return "cpu"
        return "disk" if self.distill.replay_spill else None

    def _replay_allocator(self, tier: str):
        return self.allocator("disk") if tier == "disk" else None

    def _note_replay_peak(self) -> None:
        for place, nbytes in (("host", self.replay.host_bytes + self.teacher_replay.host_bytes),
                              ("disk", self.replay.disk_bytes + self.teacher_replay.disk_bytes)):
            self.replay_peak[place] = max(self.replay_peak[place], nbytes)

    def target_group(self, name: str) -> list[str]:
        """Block `name` and the blocks after it whose targets fit with it in target_cache_mb (fp32, all N rows)."""
        if name == WHOLE_MODEL or self.distill.target_cache_mb == 0:
            return [name]
        blocks = [b for b in self.blocks if b != WHOLE_MODEL]  # the end-to-end stage's targets come on their own
        if self._target_row_bytes is None:  # one teacher pass on one row: each block's output size
            example = self.calibration_batch(slice(0, 1))
            with torch.no_grad(), self.teacher_autocast(example):
                sizes = capture_outputs(self.teacher, blocks, example)
            self._target_row_bytes = {n: sum(t[0].numel() * 4 for t in ts) for n, ts in sizes.items()}
        budget, k = self.distill.target_cache_mb * 2**20, blocks.index(name)
        group, total = [name], self._target_row_bytes[name] * self.num_local
        for other in blocks[k + 1 :]:
            total += self._target_row_bytes[other] * self.num_local
            if total > budget:
                break
            group.append(other)
        return group

    @torch.no_grad()
    def record_replay(self, k: int) -> None:
        """Trained block k's outputs on every capture chunk, for the later blocks' prefix passes: the values
        when a later block reads them (on the host within replay_cache_mb, else on disk with replay_spill),
        the shapes always (a stand-in once no block still to run reads them)."""
        name = self.blocks[k]
        off = self.distill.replay_cache_mb == 0
        if off or name == WHOLE_MODEL or self.cache is None or all(b == WHOLE_MODEL for b in self.blocks[k + 1 :]):
            return
        block, step = self.block_module(name), self.distill.capture_batch_size
        starts = list(range(0, self.num_local, step))
        keep, shapes, values, tier = max(self._readers.get(name, frozenset()), default=-1) > k, [], [], None
        for start in starts:
            rows = slice(start, start + step)
            with step_context(self.student, self.calibration_steps(self.global_rows(rows))):
                output = self.cache.run(block, rows, as_captured=True)
            if not shapes:
                if not BlockReplay.replayable(output):
                    return
                # the first chunk is the largest: the size of the whole output is bounded ahead
                tier = self.replay_tier(nbytes_of(output) * len(starts), output) if keep else None
                keep = tier is not None
            shapes.append(BlockReplay.shapes_of(output))
            if keep:  # values not kept are never held, not even for the length of this loop
                # (a fresh output of the block alone: nothing after it can change it in place)
                values.append(BlockReplay.stored(output, self._replay_allocator(tier), copy=False))
        self.replay.record(name, shapes, values if keep else None, on_disk=tier == "disk")
        self._note_replay_peak()

    def _capture_student_inputs(self, name: str, chunk: int, batch: dict[str, torch.Tensor],
                                standins: set[str]) -> BlockIO:
        with self.replay.replaying(self.student, chunk, batch["x_t"].device, standins):
            return capture_block(self.student, name, batch, want_output=False).to("cpu")

    def cache_tier(self, name: str) -> str:
        """The tier block `name`'s cache is allocated in: the planned one (`planned_tiers`, from the run's
        plan) under cache_device "auto", "disk" or the given device's, else "cpu" (the host, from where
        cache_device_for moves it by its exact size)."""
        setting = self.distill.cache_device
        if setting == "auto":
            return self.planned_tiers.get(name, "cpu")
        return "disk" if setting == "disk" else "cpu"

    def tier_device(self, tier: str) -> torch.device:
        """The device of a tier: the module's GPU for "cuda", the CPU for host memory and disk."""
        return self.device if tier == "cuda" and self.device.type == "cuda" else torch.device("cpu")

    def allocator(self, tier: str):
        return tier_allocator(tier, self.tier_device(tier), self.distill.cache_dir)

    def cache_device_for(self, nbytes: int) -> torch.device:
        """The device of a block cache of `nbytes` bytes, from distill.cache_device ("auto": the module's
        CUDA device if the cache fits in cache_gpu_fraction of its free memory, else the CPU)."""
        setting = self.distill.cache_device
        if setting == "disk":
            return torch.device("cpu")
        if setting != "auto":
            return torch.device(setting)
        if self.device.type != "cuda":
            return torch.device("cpu")
        free = free_gpu_bytes(self.device)
        return choose_cache_device(nbytes, self.device, free, self.distill.cache_gpu_fraction)

    @torch.no_grad()
    def initialize_block(self, name: str) -> None:
        """TPQ tables of the block's activation quantizers, per group, from its cached inputs (on X/s:
        WD was applied when the student was built). Weight quantizers were set from the weights then."""
        block = self.block_module(name)
        if not any(isinstance(m, TemporalActQuantizer) for m in block.modules()):
            return
        # one sampling step per chunk: each TPQ observer then takes one update per chunk, not one per step
        # present in a mixed chunk (the update, with its reservoir draw, is what costs on a small model)
        steps = self.calibration["step"] if self.local_rows is None else self.calibration["step"][self.local_rows]
        with calibrate_activations(block, seed=self.seed) as quantizers:
            for value in steps.unique().tolist():
                for rows in torch.nonzero(steps == value).flatten().split(self.distill.capture_batch_size):
                    with step_context(self.student, self.calibration_steps(self.global_rows(rows))):
                        self.cache.call(block, self._device_rows(rows))
            if self.local_rows is not None:  # each rank saw its share: the statistics of all of them
                merge_observations(quantizers, seed=self.seed)

    def _device_rows(self, rows: torch.Tensor | slice) -> torch.Tensor | slice:
        """Row indices on the device of the current cache (the device it was actually placed on)."""
        return rows if isinstance(rows, slice) else rows.to(self.cache.device)

    def block_iters(self, k: int) -> int:
        """Training iterations of block k: iters_per_block, or end_to_end_iters for the end-to-end stage."""
        return self.distill.end_to_end_iters if self.is_end_to_end_stage(k) else self.distill.iters_per_block

    def is_end_to_end_stage(self, k: int) -> bool:
        """Whether block k is the end-to-end stage after BKD (the whole student, already initialised)."""
        return self.blocks[k] == WHOLE_MODEL and not self.distill.whole_model

    @property
    def decaying_lowrank(self) -> bool:
        """Whether the student's low-rank branches decay while their block trains (quant.lowrank_mode "decay")."""
        return self.quant_config.lowrank_rank > 0 and self.quant_config.lowrank_mode == "decay"

    def lowrank_weight(self, iteration: int) -> float:
        """λ of the current block's decaying low-rank branches at its `iteration` (`lowrank_weight`)."""
        return lowrank_weight(iteration, self.block_iters(self.state.block), self.distill.lowrank_decay_end)

    def learning_rate_factor(self, iteration: int) -> float:
        """Cosine decay over the current block's iterations, from 1 to min_lr_ratio."""
        total, floor = max(1, self.block_iters(self.state.block)), self.distill.min_lr_ratio
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / total))

    # ------------------------------------------------------------------ block lifecycle

    def setup(self, stage: str) -> None:
        """Load the calibration tuples and order the blocks (Lightning calls this on every rank)."""
        source = self.calibration_source
        # where this process runs: the Trainer's device (it moves the module after setup), else the module's
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        if isinstance(source, Mapping):
            self.calibration = dict(source)
        else:
            phase("calibration")
            enter_phase("calibration", device)  # the trajectories are generated there (or read from the cache)
            self.calibration = source.load(device)
        for key in ("x_t", "timestep", "step"):
            if key not in self.calibration:
                raise UserError(f"calibration data lacks {key!r}; it has {sorted(self.calibration)}")
        self.num_samples = int(self.calibration["x_t"].shape[0])
        world, rank = self._world()
        self.local_rows = None if world == 1 else torch.arange(rank, self.num_samples, world)
        self.calibration = with_guidance_rows(self.calibration, self.distill.uncond_fraction, self.seed)
        if self.num_samples < self.distill.batch_size:
            raise UserError(f"{self.num_samples} calibration samples are fewer than one batch ({self.distill.batch_size})")
        num_steps, steps = tpq_num_steps(self.student), self.calibration["step"]
        if num_steps is not None and (int(steps.min()) < 0 or int(steps.max()) >= num_steps):
            raise UserError(f"calibration step indices must lie in [0, {num_steps}) (the student's TPQ tables), got "
                            f"[{int(steps.min())}, {int(steps.max())}]")
        self.setup_blocks()
        self.store_teacher_in_bf16()
        enter_phase("bkd" if self.distill.iters_per_block > 0 else "initialisation", device)

    def store_teacher_in_bf16(self) -> None:
        """teacher_precision "bf16": the teacher's Linear and convolution weights and biases are stored in
        bfloat16 for BKD (half their memory on the device), the fp32 values kept on the host and put back
        when training ends (`restore_teacher`: calibration before BKD and the fidelity check after it use the
        fp32 teacher). Under the teacher's bf16 autocast those layers compute on bfloat16 copies of their
        weights anyway, so the targets do not change; norms and embeddings stay fp32."""
        if self.distill.teacher_precision != "bf16" or self._teacher_fp32:
            return
        for name, module in self.teacher.named_modules():
            if isinstance(module, BF16_LAYERS):
                for key, param in module.named_parameters(recurse=False):
                    if param.dtype == torch.float32:
                        self._teacher_fp32[f"{name}.{key}"] = param.detach().to("cpu", copy=True)
                        param.data = param.data.to(torch.bfloat16)

    def restore_teacher(self) -> None:
        """Put back the teacher's fp32 weights stored in bf16 by store_teacher_in_bf16 (on their device)."""
        for path, value in self._teacher_fp32.items():
            param = self.teacher.get_parameter(path)
            param.data = value.to(param.device)
        self._teacher_fp32 = {}

    def teardown(self, stage: str) -> None:
        self.restore_teacher()
        self.stop_offload()

    def place_blocks(self, k: int) -> None:
        """offload: block k of the student on the module's device and every other block of the student and of
        the teacher in host memory, each moved to the device for a call and back (a frozen block runs in
        the first chunk's check of a prefix pass, a teacher block in its target pass); replayed blocks do
        not run and stay where they are. The end-to-end stage trains the whole student: all of it comes back
        to the device. On a CPU run the device is the host and nothing moves."""
        if not self.distill.offload:
            return
        if self.is_end_to_end_stage(k):
            self.stop_offload(student_only=True)
            self.student.to(self.device)
            return
        current = self.blocks[k]
        for model in (self.student, self.teacher):
            for name in (b for b in self.blocks if b != WHOLE_MODEL):
                module = model.get_submodule(name)
                key = (id(model), name)
                if model is self.student and name == current:
                    for handle in self._offload_hooks.pop(key, []):
                        handle.remove()
                    module.to(self.device)
                elif key not in self._offload_hooks:
                    module.to("cpu")
                    self._offload_hooks[key] = [module.register_forward_pre_hook(self._moved_in),
                                                module.register_forward_hook(self._moved_out)]

    def _moved_in(self, module: nn.Module, args) -> None:
        if "forward" not in module.__dict__:  # a replayed or stand-in block (its forward patched) does not run
            module.to(self.device)

    def _moved_out(self, module: nn.Module, args, output) -> None:
        if "forward" not in module.__dict__:
            module.to("cpu")

    def stop_offload(self, student_only: bool = False) -> None:
        """Remove the offload hooks (of the student's blocks only, or all); the blocks stay where they are."""
        for key in list(self._offload_hooks):
            if not student_only or key[0] == id(self.student):
                for handle in self._offload_hooks.pop(key):
                    handle.remove()

    def setup_blocks(self) -> None:
        """The block list in execution order (the whole student for end-to-end QAT)."""
        self.blocks = training_blocks(self.student, self.distill)
        blocks = [b for b in self.blocks if b != WHOLE_MODEL]
        if blocks:
            # Lightning may call setup before it moves the module: run the example where the teacher is
            device = next(self.teacher.parameters()).device
            example = {k: v.to(device) for k, v in self.calibration_batch(slice(0, 2)).items()}
            check_block_order(self.teacher, blocks, example)
            self._readers = block_readers(self.teacher, blocks, example) if self.distill.replay_cache_mb > 0 else {}
        if not self.state.initialized:
            self.state.initialized = [False] * len(self.blocks)

    def begin_block(self, k: int) -> None:
        """Cache block k's inputs and targets, initialise its quantizers (once), build its optimizer."""
        if self._resume is not None and self._resume["blocks"] != self.blocks:
            raise UserError("the checkpoint was written for another block list (another model or method)")
        if k != self.state.block:  # a new block, not a resume into the middle of one
            self.state.block, self.state.iteration = k, 0
        name = self.blocks[k]
        phase("prepare", f"block {k + 1}/{len(self.blocks)}: {name or 'the whole model (end to end)'}")
        if self.is_end_to_end_stage(k):
            enter_phase("end_to_end", self.device)  # the stage after BKD: a phase of its own
        self.place_blocks(k)
        started = time.perf_counter()
        self.cache = self.build_cache(name)
        cached = time.perf_counter()
        self.prep_seconds["cache"] += cached - started
        if self.is_end_to_end_stage(k):
            self._stage_started = started
            # every block was frozen when it ended; the stage trains what the optimizer holds, all at once
            for group in (self.optimizers().param_groups if self._trainer is not None else []):
                for param in group["params"]:
                    param.requires_grad_(True)
        elif not self.state.initialized[k]:
            self.initialize_block(name)
            self.state.initialized[k] = True
        self.prep_seconds["init"] += time.perf_counter() - cached
        self._compiled.clear()
        if self.distill.compile:  # lazy: torch.compile compiles at the block's first training step
            self._compiled[name] = torch.compile(
                self.block_module(name), mode=self.distill.compile_mode, backend=self.distill.compile_backend
            )
            self._compiled_checked = False
        self.block_prep_seconds[name or "model"] = time.perf_counter() - started
        resumed, self._resume = self._resume, None
        # a checkpoint written after block k-1 ended holds block k at iteration 0: block k starts afresh
        if resumed is None or resumed["block"] != k or resumed["iteration"] == 0:
            self._set_block_learning_rates(k)
            self._losses = []
        self.place_optimizer_state(k)

    def place_optimizer_state(self, k: int) -> None:
        """Adam's state where block k needs it: the current block's (every block's in the end-to-end stage) on the
        module's device; a trained block's on the host while an end-to-end stage is still to come (it continues
        from those moments), else freed (a frozen block gets no gradient again). So the device holds the
        optimizer state of one block at a time, whatever the depth; the training is the same."""
        if self._trainer is None:
            return
        stage_ahead = any(self.is_end_to_end_stage(j) for j in range(k, len(self.blocks)))
        current = self.block_module(self.blocks[k])
        here = {id(p) for p in current.parameters()}
        optimizer = self.optimizers(use_pl_optimizer=False)
        for param in list(optimizer.state):
            if id(param) in here:
                target = param.device
            elif stage_ahead:
                target = torch.device("cpu")
            else:
                del optimizer.state[param]
                continue
            state = optimizer.state[param]
            for key, value in state.items():
                # Adam's step count stays where it is (a CPU scalar unless capturable/fused)
                if isinstance(value, torch.Tensor) and key != "step" and value.device != target:
                    state[key] = value.to(target)

    def end_block(self) -> None:
        """Record block k's final loss (mean of its last 20 iterations), freeze it, move the cursor on."""
        name = self.blocks[self.state.block]
        if self._losses:
            tail = self._losses[-20:]
            self.state.final_losses[name or "model"] = sum(tail) / len(tail)
        self.block_module(name).requires_grad_(False)
        if self.decaying_lowrank:  # λ has reached 0: the branches add nothing and leave the student
            drop_lowrank(self.block_module(name))
        started = time.perf_counter()
        self.record_replay(self.state.block)
        self.prep_seconds["replay"] += time.perf_counter() - started
        self.cache, self._losses = None, []
        if self._stage_started is not None:
            self.end_to_end_seconds += time.perf_counter() - self._stage_started
            self._stage_started = None
        if self._compiled:
            # Dynamo keeps its compiled code per code object (shared by every block of a class), guarded by
            # shapes and module attributes: without a reset, blocks would pile up recompilations until
            # Dynamo's recompile limit and then silently fall back to eager
            self._compiled.clear()
            torch._dynamo.reset()
        self.state.block, self.state.iteration = self.state.block + 1, 0

    def initialize_only(self) -> None:
        """Block-by-block initialisation without training (the PTQ methods, iters_per_block = 0)."""
        self.setup("fit")
        try:
            for k in range(self.state.block, len(self.blocks)):
                self.begin_block(k)
                self.end_block()
        finally:
            self.restore_teacher()
            self.stop_offload()
            self.to(self.device)

    def block_finished(self, k: int) -> bool:
        """Whether block k has run all its iterations (the epoch of a cut-short block is not finished)."""
        return self.state.block > k or (self.state.block == k and self.state.iteration >= self.block_iters(k))

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self) -> None:
        if self.local_rows is not None:  # the gradients are summed by _all_reduce_gradients, for the block only
            wrapper = self.trainer.strategy.model
            if hasattr(wrapper, "require_backward_grad_sync"):
                wrapper.require_backward_grad_sync = False
        epochs = self.trainer.max_epochs
        if epochs is None or epochs > len(self.blocks):  # fewer: a partial run (bench)
            raise UserError(f"the trainer runs {epochs} epochs but the student has {len(self.blocks)} blocks")
        lengths = {self.block_iters(k) for k in range(len(self.blocks))}
        if len(lengths) > 1 and self.trainer.reload_dataloaders_every_n_epochs != 1:
            raise UserError("the blocks have different iteration counts (end_to_end_iters): the Trainer needs "
                            "reload_dataloaders_every_n_epochs=1 so that each block's loader has its own length")

    def on_train_epoch_start(self) -> None:
        self.begin_block(self.current_epoch)

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.cache is None:  # resumed mid-block: Lightning does not rerun on_train_epoch_start
            self.begin_block(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        """End the block when its iterations are done (not when the epoch was cut short: max_steps, an
        interrupt). Runs after the observing callbacks and before checkpoint callbacks (Lightning's order)."""
        if self.state.block != self.current_epoch or not self.block_finished(self.current_epoch):
            return
        name = self.blocks[self.state.block] or "model"
        self.end_block()
        if name in self.state.final_losses:
            self.log("bkd/final_loss", self.state.final_losses[name], on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """One Adam over the whole student. Only the current block receives gradients and Adam keeps
        per-parameter state, so this equals a fresh optimizer per block; the cosine schedule restarts with
        each block (training_step). The end-to-end stage is the exception: every parameter has been trained
        in its block by then, and the stage continues its Adam moments from there (how the default was
        measured; a fresh state for the stage was not). Groups: the weights (lr_weights); each quantizer's
        step size Δ, whose lr is lr_quant × its mean |Δ| at the start of its block (Adam's steps have a
        fixed size, and Δ spans orders of magnitude across layers and bit-widths); all zero points
        (lr_zero_point, in grid codes)."""
        weights, zero_points, groups = [], [], []
        for name, module in self.student.named_modules():
            if isinstance(module, (TemporalActQuantizer, WeightQuantizer)):
                groups.append({"params": [module.scale], "lr": 0.0, "base_lr": 0.0, "quantizer": name})
                if isinstance(module.zero_point, nn.Parameter):  # a per-token quantizer's is a fixed buffer
                    zero_points.append(module.zero_point)
        quant_ids = {id(g["params"][0]) for g in groups} | {id(z) for z in zero_points}
        weights = [p for p in self.student.parameters() if id(p) not in quant_ids]
        groups.append({"params": zero_points, "lr": self.distill.lr_zero_point, "base_lr": self.distill.lr_zero_point,
                       "kind": "zero_point"})
        if self.distill.train_weights and self.distill.lr_weights > 0:
            groups.append({"params": weights, "lr": self.distill.lr_weights, "base_lr": self.distill.lr_weights,
                           "kind": "weights"})
        else:
            for param in weights:
                param.requires_grad_(False)
        return torch.optim.Adam(groups)

    def _set_block_learning_rates(self, k: int) -> None:
        """base_lr of every group for block k: each of its Δ groups lr_quant × mean |Δ| (Δ is initialised by
        now), the weights and zero points their rates; the end-to-end stage's own rates in that stage."""
        if self._trainer is None:
            return
        name, d = self.blocks[k], self.distill
        stage = self.is_end_to_end_stage(k)
        rates = {"weights": d.end_to_end_lr_weights if stage else d.lr_weights,
                 "zero_point": d.end_to_end_lr_zero_point if stage else d.lr_zero_point}
        lr_quant = d.end_to_end_lr_quant if stage else d.lr_quant
        prefix = "" if name == WHOLE_MODEL else name + "."
        for group in self.optimizers().param_groups:
            quantizer = group.get("quantizer")
            if quantizer is None:
                group["base_lr"] = rates[group["kind"]]
            elif not prefix or quantizer.startswith(prefix):
                group["base_lr"] = lr_quant * float(group["params"][0].detach().abs().mean())

    def configure_callbacks(self) -> list[L.Callback]:
        """The TPQ timestep-group schedule (method.distill.group_schedule), a callback that the batches follow."""
        return [self.group_schedule]

    def train_dataloader(self) -> BlockBatches:
        steps = self.calibration["step"]
        self.group_schedule.bind(steps, step_groups(self.quant_config.num_steps, self.quant_config.num_groups))
        return BlockBatches(steps, self.group_schedule, self.distill.batch_size,
                            [self.block_iters(k) for k in range(len(self.blocks))], self.state)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return unet_forward(self.student, x, timesteps, cond)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        fault_point("train")
        name = self.blocks[self.state.block]
        rows, steps, weight = self.shard(batch["index"], batch["step"])  # this rank's share, its TPQ steps
        if self.decaying_lowrank and not self.is_end_to_end_stage(self.state.block):
            set_lowrank_scale(self.block_module(name), self.lowrank_weight(self.state.iteration))
        optimizer = self.optimizers()
        factor = self.learning_rate_factor(self.state.iteration)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.zero_grad(set_to_none=True)
        micro = self.distill.micro_batch_size or len(rows)
        if self.local_rows is None and micro >= len(rows):  # the batch in one pass: its mean (eq. 15)
            loss = self._batch_loss(name, rows, steps, None)
            self.manual_backward(loss)
        else:  # this rank's rows, in passes of micro_batch_size: each its share of the batch mean
            scale, loss = weight / len(batch["index"]), 0.0
            for start in range(0, len(rows), micro):
                part = self._batch_loss(name, rows[start : start + micro], steps[start : start + micro], scale,
                                        start // micro)  # (each pass its own activation-drop masks)
                self.manual_backward(part)  # the gradients add up to those of the whole batch
                loss = loss + part.detach()
        if self.local_rows is not None:
            self._all_reduce_gradients(name)
        optimizer.step()
        keep_step_sizes_positive(optimizer)
        self.state.iteration += 1
        reported = loss.detach()
        if self.local_rows is not None:  # the whole batch's loss: the sum of the ranks' shares
            reported = self.trainer.strategy.reduce(reported, reduce_op="sum")
        self._losses.append(float(reported))
        self.log("bkd/loss", reported, prog_bar=True, on_step=True, on_epoch=False, sync_dist=False)
        self.log("bkd/block", float(self.state.block), on_step=True, on_epoch=False)
        return loss

    def _batch_loss(self, name: str, rows: torch.Tensor, steps: torch.Tensor, scale: float | None,
                    part: int = 0) -> torch.Tensor:
        """The loss of the current block on cached rows `rows` (their TPQ `steps`): the mean squared error to
        the targets (scale None), or the sum of squared errors × scale / (elements per row), a share of a mean
        taken over more rows than these. A block returning several tensors (a joint-attention transformer
        block): the mean of their losses."""
        with step_context(self.student, steps.to(self.device)), self._activation_drop(name, part), \
                self._recomputing(name):
            predictions = self._block_forward(name, self._device_rows(rows))
        targets = [t[self._device_rows(rows)].to(p.device) for p, t in zip(predictions, self.cache.output, strict=True)]
        if scale is None:
            losses = [F.mse_loss(p.float(), t.float()) for p, t in zip(predictions, targets)]  # eq. 15
        else:
            losses = [F.mse_loss(p.float(), t.float(), reduction="sum") * (scale / p[0].numel())
                      for p, t in zip(predictions, targets)]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def _recomputing(self, name: str) -> contextlib.AbstractContextManager:
        """The end-to-end stage with end_to_end_recompute: every block recomputed in backward
        (blocks.recomputed_blocks), so the stage holds one block's activations at a time."""
        if name != WHOLE_MODEL or not self.distill.end_to_end_recompute:
            return contextlib.nullcontext()
        return recomputed_blocks(self.student, [b for b in self.blocks if b != WHOLE_MODEL])

    def _activation_drop(self, name: str, part: int = 0) -> contextlib.AbstractContextManager:
        """act_drop > 0: the block's activation quantizers pass a random share of elements unquantized, the
        masks a pure function of (seed, block, iteration, rank, micro-batch pass `part`) like the batches;
        else nothing."""
        if self.distill.act_drop == 0.0:
            return contextlib.nullcontext()
        rank = self.trainer.global_rank if self._trainer is not None else 0
        generator = torch.Generator(device=self.device)
        generator.manual_seed(((self.seed * 1_000_003 + self.state.block) * 1_000_003 + self.state.iteration)
                              * 1_009 + rank + 7 + part * 7_919)
        return activation_drop(self.block_module(name), self.distill.act_drop, generator)

    def _block_forward(self, name: str, rows: torch.Tensor | slice) -> list[torch.Tensor]:
        """The current block's output tensors on cached rows `rows`, through its torch.compile wrapper with
        distill.compile (the training steps only; initialisation and capture run eagerly)."""
        block = self.block_module(name)
        compiled = self._compiled.get(name)
        if compiled is None:
            return self.cache.call(block, rows)
        if not self._compiled_checked:
            # One eager forward without gradients first: each activation quantizer checks once, eagerly, that
            # it is calibrated. Traced, that data-dependent check would break the first compiled graph and
            # force a recompilation at the second step.
            with torch.no_grad():
                self.cache.call(block, rows)
            self._compiled_checked = True
        return self.cache.call(compiled, rows)

    def shard(self, index: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's share of a global batch (calibration rows `index`, their TPQ `steps`): the positions in its
        caches of the rows it holds (row r lives on rank r % world at position r // world), their steps, and
        the weight of its loss (1; 0 when it holds none of the rows: it then runs one row of its own, so that
        every rank takes part in the gradient sum)."""
        if self.local_rows is None:
            return index, steps, 1.0
        world, rank = self._world()
        mine = index % world == rank
        if not bool(mine.any()):
            return torch.zeros_like(index[:1]), self.calibration_steps(self.local_rows[:1]).to(steps), 0.0
        return torch.div(index[mine], world, rounding_mode="floor"), steps[mine], 1.0

    @torch.no_grad()
    def _all_reduce_gradients(self, name: str) -> None:
        """Sum the gradients of the block being trained over the ranks, in one flat buffer (DDP's own reduction
        is off: it would send the whole student's gradients every step). A parameter without a gradient on
        every rank keeps none."""
        params = [p for p in self.block_module(name).parameters() if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        present = torch.tensor([p.grad is not None for p in params], dtype=flat.dtype, device=flat.device)
        both = torch.cat([flat, present])
        torch.distributed.all_reduce(both)
        offset = 0
        for p, has in zip(params, both[flat.numel():].tolist(), strict=True):
            size = p.numel()
            p.grad = both[offset : offset + size].view_as(p) if has > 0 else None
            offset += size

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["bkd"] = {
            "block": self.state.block,
            "iteration": self.state.iteration,
            "initialized": list(self.state.initialized),
            "final_losses": dict(self.state.final_losses),
            "blocks": list(self.blocks),
            "rng": torch.get_rng_state(),
            "recent_losses": list(self._losses),
        }
        if self.run_identity is not None:
            checkpoint[IDENTITY_KEY] = self.run_identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "bkd" not in checkpoint:
            raise UserError("this checkpoint has no BKD state: was it written by dq's train.py?")
        saved = checkpoint["bkd"]
        # in place: the training data's cursor is this object
        self.state.block, self.state.iteration = saved["block"], saved["iteration"]
        self.state.initialized, self.state.final_losses = list(saved["initialized"]), dict(saved["final_losses"])
        self._resume = saved
        self._losses = list(saved.get("recent_losses", []))
        torch.set_rng_state(saved["rng"])

    def state_dict(self, *args, **kwargs):
        # the teacher is rebuilt from the model config; only the student's state is worth saving
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.decaying_lowrank:  # the blocks trained before the checkpoint dropped their decayed branches
            drop_lowrank_absent(self.student, state_dict, prefix="student.")
        missing_teacher = {k: v for k, v in self.teacher.state_dict(prefix="teacher.").items()}
        return super().load_state_dict({**missing_teacher, **state_dict}, strict=strict, assign=assign)


def lowrank_weight(iteration: int, iterations: int, decay_end: float) -> float:
    """λ of a decaying low-rank branch at `iteration` of its block's `iterations`: cosine from 1 to 0 over the
    first `decay_end` share of them, 0 after."""
    span = max(1.0, decay_end * iterations)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, iteration / span)))


def _host_rows(rows: torch.Tensor | slice) -> torch.Tensor | slice:
    """Row indices for the calibration tensors, which stay on the CPU (a batch's index may be on the GPU)."""
    return rows if isinstance(rows, slice) else rows.cpu()


@torch.no_grad()
def keep_step_sizes_positive(optimizer: torch.optim.Optimizer) -> None:
    """Project every quantizer step size Δ (the optimizer's "quantizer" groups) back onto Δ >= MIN_STEP_SIZE
    after a step: a long schedule or a high learning rate can otherwise drive Δ to zero or below, where
    fake quantization divides by it. A no-op while every Δ stays above the floor (the usual case)."""
    for group in optimizer.param_groups:
        if "quantizer" in group:
            group["params"][0].clamp_(min=MIN_STEP_SIZE)
