"""The plan of a training job, made before it runs: what each phase holds in GPU and host memory, what each
block's cache takes, how large the calibration file is and how long the run should take (docs/planning.md).

Everything is computed on the meta device from the denoiser's config: the FP teacher and the quantized
student are built there (no weights), and each phase's computation runs on tensors that have shapes but no
data, under a tracker that follows every allocation and free (torch's MemTracker) and a FLOP counter. So a
plan needs no weights and no GPU, and `python train.py model=sd_v1_4 plan=true` runs on a laptop.

    plan = make_plan(teacher_on_meta, quant_config, distill, spec)
    print(plan.table()); plan.check_fits()     # UserError naming the phase that does not fit

What the plan models is the code as it is (docs/planning.md lists each phase's terms):
- a block's cache: its student-path inputs over the rank's calibration rows (N / W under DDP; shared inputs
  once) and the teacher's targets, in method.distill.cache_dtype, placed in the tier the plan picks;
- GPU: the teacher (Linear / conv weights in bf16 with teacher_precision bf16) and the student, whole or with
  offload one block of each, plus per phase the peak of the phase's own computation: calibration sampling
  (classifier-free guidance doubles the batch), the capture passes (capture_batch_size rows), the
  quantizers' initialisation, a training step of each block at micro_batch_size rows (forward, backward,
  its gradients) with Adam's state of the block, the end-to-end stage, the fidelity sampling; a cache
  placed on the GPU adds to the phases that hold it. fit_batches lowers the batches whose phase would not
  fit;
- host: the teacher and student at load time, the calibration tuples (text embeddings once per prompt), a
  capture chunk, a cache in host memory, the teacher targets captured ahead (target_cache_mb), the outputs
  carried forward (replay_cache_mb on the host, the rest on disk) and what offload keeps there.
The time is FLOPs (the FP denoiser's, from torch's FLOP counter) over a stated throughput: the
fake-quantized student does more work per FLOP than the FP model, so the estimate is a floor for BKD.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from dq.arch import describe
from dq.errors import UserError
from dq.io import atomic_write

GIB = 2**30
MIB = 2**20
# Throughputs the time estimate assumes when none is measured or given (budget.tflops): an H100/H200's
# dense fp32 matmul rate (67 TFLOP/s SXM, the vendor's figure) at about 40%, and a 2-core CPU's fp32 rate.
ASSUMED_TFLOPS = {"cuda": 25.0, "cpu": 0.1}
DEFAULT_GPU_GB = 80.0  # the GPU a plan targets when the machine has none and budget.gpu_memory_gb is unset
PHASES = ("load", "calibration", "capture", "init", "train", "end_to_end", "fidelity")


@dataclass(frozen=True)
class PlanSpec:
    """What a plan needs besides the model: the run's sizes and the device it targets."""

    num_samples: int  # N calibration tuples
    num_trajectories: int  # FP sampling trajectories that produce them
    generation_batch_size: int
    num_steps: int  # sampling steps
    guidance: bool  # classifier-free guidance: uncond stored, doubled sampling batches
    cond_shape: tuple[int, ...] | None  # one row's conditioning without the batch dimension; () for a class label
    cond_dtype: torch.dtype = torch.float32
    # distinct text conditions (prompts) of the calibration trajectories: text embeddings are stored once each
    # (dq.calibration.tuples); None: as many as the trajectories
    num_prompts: int | None = None
    world_size: int = 1  # DDP processes sharing the calibration rows (trainer=ddp)
    fidelity_samples: int = 256
    fidelity_batch_size: int = 128
    device: str = "cpu"  # "cuda" | "cpu": where the phases run
    gpu_bytes: int | None = None  # the GPU memory the run may use (None: no GPU)
    host_bytes: int | None = None  # the host memory it may use (None: unchecked)
    disk_bytes: int | None = None  # free disk space under the block caches' folder (None: unchecked)
    tflops: float = ASSUMED_TFLOPS["cpu"]
    tflops_source: str = "assumed"


@dataclass
class BlockPlan:
    """One trained block (or the whole model, name ""): its cache and its phases' peaks."""

    name: str
    input_bytes: int  # the student-path inputs over all rows, as build_cache stores them
    target_bytes: int  # the teacher's fp32 targets over all rows
    cache_device: str
    trainable: int  # parameters the block trains (weights and quantizer tables)
    step_bytes: int = 0  # a training step's own peak (activations, temporaries, gradients) beyond the models
    gpu: dict[str, int] = field(default_factory=dict)  # phase -> peak bytes
    host: int = 0  # peak host bytes while the block is prepared and trained
    replay_bytes: int = 0  # outputs carried forward while the block is prepared (host and disk; replay_cache_mb)
    flops: dict[str, float] = field(default_factory=dict)  # work -> FLOPs

    @property
    def cache_bytes(self) -> int:
        return self.input_bytes + self.target_bytes


@dataclass
class Plan:
    """A run's plan; `table()` prints it, `to_dict()` is plan.json."""

    spec: PlanSpec
    model: str
    parameters: int
    blocks: list[BlockPlan]
    gpu: dict[str, int]  # phase -> peak bytes over the run (the device's memory when it is the CPU: host)
    host: dict[str, int]  # phase -> peak host bytes
    disk: int  # the largest disk-tier cache (memory-mapped files under method.distill.cache_dir)
    calibration_file_bytes: int
    seconds: dict[str, float]
    end_to_end_recompute: bool = False
    # the batch sizes the plan is for: capture (and initialisation), the training batch's passes (micro) and
    # fidelity; on a GPU, lowered from the configured ones where their phase would not fit (fit_batches)
    batch_sizes: dict[str, int] = field(default_factory=dict)

    def peak(self, where: str) -> tuple[str, int]:
        """(phase, bytes) of the largest peak on "gpu" or "host"."""
        phases = self.gpu if where == "gpu" else self.host
        name = max(phases, key=phases.get)
        return name, phases[name]

    def to_dict(self) -> dict[str, Any]:
        spec = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(self.spec).items()}
        return {
            "model": self.model, "parameters": self.parameters, "spec": spec,
            "gpu_peak_bytes": self.gpu if self.spec.device == "cuda" else {},
            "host_peak_bytes": self.host,
            "disk_peak_bytes": self.disk,
            "calibration_file_bytes": self.calibration_file_bytes,
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "constants": {"tflops": self.spec.tflops, "tflops_source": self.spec.tflops_source},
            "blocks": [{**asdict(b), "cache_bytes": b.cache_bytes} for b in self.blocks],
            "batch_sizes": self.batch_sizes,
        }

    def write(self, path: str | Path) -> None:
        # every DDP rank writes the same plan: each write is whole
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))

    def table(self) -> str:
        """The per-block table, the phase peaks and one last line with the peaks and the time estimate."""
        cuda = self.spec.device == "cuda"
        head = f"{'block':<44} {'inputs':>9} {'targets':>9} {'cache on':>8} {'train GPU':>10} {'host':>9} {'train s':>8}"
        lines = [f"dq: plan for {self.model} ({self.parameters / 1e6:.1f}M parameters), N = {self.spec.num_samples}, "
                 f"on {'the GPU' if cuda else 'the CPU'}", head]
        for b in self.blocks:
            seconds = b.flops.get("train", 0.0) / (self.spec.tflops * 1e12)
            lines.append(f"{(b.name or '(whole model, end to end)')[:44]:<44} {_gib(b.input_bytes):>9} "
                         f"{_gib(b.target_bytes):>9} {b.cache_device:>8} "
                         f"{_gib(b.gpu.get('train', b.gpu.get('end_to_end', 0))) if cuda else '-':>10} "
                         f"{_gib(b.host):>9} {seconds:>8.0f}")
        if cuda:
            lines.append("GPU peak by phase: " + ", ".join(f"{k} {_gib(v)}" for k, v in self.gpu.items()))
        lines.append("host peak by phase: " + ", ".join(f"{k} {_gib(v)}" for k, v in self.host.items()))
        lines.append("time by phase: " + ", ".join(f"{k} {_duration(v)}" for k, v in self.seconds.items()
                                                   if k != "total"))
        if self.batch_sizes:
            lines.append("batch sizes: " + ", ".join(f"{k} {v}" for k, v in self.batch_sizes.items())
                         + " (capture and initialisation, the training batch's passes, fidelity)")
        lines.append(f"time constants: {self.spec.tflops:g} TFLOP/s ({self.spec.tflops_source}); FLOPs of the FP "
                     "model (the fake-quantized student does more work per FLOP: a floor for BKD)")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        host_phase, host = self.peak("host")
        parts = []
        if self.spec.device == "cuda":
            gpu_phase, gpu = self.peak("gpu")
            limit = f" of {_gib(self.spec.gpu_bytes)}" if self.spec.gpu_bytes else ""
            parts.append(f"peak GPU {_gib(gpu)}{limit} ({gpu_phase})")
        limit = f" of {_gib(self.spec.host_bytes)}" if self.spec.host_bytes else ""
        parts.append(f"peak host {_gib(host)}{limit} ({host_phase})")
        if self.disk:
            parts.append(f"block caches on disk up to {_gib(self.disk)}")
        parts.append(f"calibration file {_gib(self.calibration_file_bytes)}")
        parts.append(f"estimated time {_duration(self.seconds['total'])} at {self.spec.tflops:g} TFLOP/s")
        return "dq: plan: " + ", ".join(parts)

    def check_fits(self) -> None:
        """UserError, in one line naming the phase and the numbers, when a phase's peak exceeds the GPU or
        host memory the spec allows."""
        checks = [("host", self.host, self.spec.host_bytes, "host memory")]
        if self.spec.device == "cuda":
            checks.insert(0, ("gpu", self.gpu, self.spec.gpu_bytes, "GPU memory"))
        if self.spec.disk_bytes is not None and self.disk > self.spec.disk_bytes:
            raise UserError(f"this run does not fit: its block caches on disk need {_gib(self.disk)}, "
                            f"{_gib(self.spec.disk_bytes)} is free under method.distill.cache_dir")
        for _where, phases, limit, words in checks:
            if not limit:
                continue
            over = {k: v for k, v in phases.items() if v > limit}
            if over:
                phase = max(over, key=over.get)
                block = self._worst_block(phase, "gpu" if words == "GPU memory" else "host")
                hint = ""
                if phase == "end_to_end" and not self.end_to_end_recompute:
                    hint = "; method.distill.end_to_end_recompute=true holds one block's activations at a time"
                raise UserError(f"this run does not fit: its {phase} phase{block} needs {_gib(over[phase])} of "
                                f"{words}, {_gib(limit)} is available (budget.*; plan=true prints the whole plan"
                                f"{hint})")

    def _worst_block(self, phase: str, where: str) -> str:
        if phase not in ("capture", "init", "train"):
            return ""
        key = (lambda b: b.gpu.get(phase, 0)) if where == "gpu" else (lambda b: b.host)
        worst = max(self.blocks, key=key, default=None)
        return f" (block {worst.name!r})" if worst is not None and worst.name else ""


def _gib(n: int | float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / MIB:.1f} MiB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# ---------------------------------------------------------------------------------------- measuring on meta


class _Peak(TorchDispatchMode):
    """Within: the peak of the bytes of storages created inside, alive at once (a storage is counted from the
    operation that makes it until it is freed; storages that existed before, and views and in-place results
    of them, are not counted). Works on the meta device, where nothing is really allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.current = self.bytes = 0
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._known.setdefault(t.untyped_storage(), False)
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._known:
                    self._known[storage] = True
                    nbytes = storage.nbytes()
                    self.current += nbytes
                    weakref.finalize(storage, self._freed, nbytes)
        self.bytes = max(self.bytes, self.current)
        return out


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient, the CUDA and CPU SDPA backends) allocates:
    its output, and in training the saved q, k, v; the meta device's SDPA is the math one, which would
    materialise the score matrix no fused kernel makes."""

    @staticmethod
    def forward(ctx, query, key, value):
        ctx.save_for_backward(query, key, value)
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        query, key, value = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


class _FusedSDPA(torch.overrides.TorchFunctionMode):
    """Within: F.scaled_dot_product_attention allocates as a fused kernel does (_FusedAttention)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            kwargs = kwargs or {}
            named = [kwargs[k] for k in ("query", "key", "value")[len(args[:3]):]]  # diffusers passes them by name
            query, key, value = [*args[:3], *named]
            return _FusedAttention.apply(query, key, value)
        return func(*args, **(kwargs or {}))


def _meta_batch(rows: int, sample: tuple[int, ...], spec: PlanSpec, num_steps: int) -> dict[str, torch.Tensor]:
    batch = {
        "x_t": torch.empty(rows, *sample, device="meta"),
        "timestep": torch.zeros(rows, dtype=torch.int64, device="meta"),
        "step": torch.zeros(rows, dtype=torch.int64, device="meta"),
    }
    if spec.cond_shape is not None:
        batch["cond"] = torch.empty(rows, *spec.cond_shape, dtype=spec.cond_dtype, device="meta")
    return batch


def _step(model: nn.Module, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
    from dq.quant import step_context, tpq_num_steps

    return step_context(model, batch["step"]) if tpq_num_steps(model) is not None else contextlib.nullcontext()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _stored_bytes(module: nn.Module, bf16_teacher: bool) -> int:
    """The bytes of `module`'s parameters and buffers as BKD holds them: with bf16_teacher, the layers a bf16
    teacher stores in bfloat16 (dq.bkd.distiller.BF16_LAYERS) at half their fp32 size."""
    from dq.bkd.distiller import BF16_LAYERS

    total = _bytes(module.buffers())
    for m in module.modules():
        own = _bytes(m.parameters(recurse=False))
        total += own // 2 if bf16_teacher and isinstance(m, BF16_LAYERS) else own
    return total


def _trainable(module: nn.Module, train_weights: bool) -> int:
    from dq.quant import act_quantizers, weight_quantizers

    quant = {id(p) for q in [*act_quantizers(module), *weight_quantizers(module)] for p in q.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) in quant or train_weights)


def _flops(fn) -> tuple[float, dict[str, float]]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), per_module


# ---------------------------------------------------------------------------------------- the plan


def meta_student(teacher: nn.Module, quant_config) -> nn.Module:
    """The quantized student of a meta-device teacher: shapes only (no WD, no weight ranges), its activation
    quantizers marked initialised so that a forward runs."""
    from dq.quant import act_quantizers, quantize_model

    student = quantize_model(teacher, quant_config, describe(teacher))
    for quantizer in act_quantizers(student):
        quantizer._checked_calibrated = True  # meta tables: nothing to check
    return student


def make_plan(teacher: nn.Module, quant_config, distill, spec: PlanSpec, model_name: str = "",
              trace: bool = True, fit_batches: bool = True) -> Plan:
    """The plan of BKD (and the end-to-end stage) of `teacher` (a denoiser on the meta device) under
    `quant_config` and `distill` (DistillConfig) with the sizes of `spec`. trace=False leaves out the phases'
    own computation (traced operation by operation: seconds to minutes), keeping the resident models, the
    caches and the host terms: what a CPU run checks before it starts."""
    from dq.arch import sample_shape
    from dq.bkd.blocks import (
        WHOLE_MODEL,
        block_io,
        block_readers,
        output_tensors,
        recomputed_blocks,
        run_model,
    )
    from dq.bkd.distiller import training_blocks
    from dq.quant import act_quantizers, set_quant_enabled

    teacher = teacher.eval().requires_grad_(False)
    student = meta_student(teacher, quant_config).requires_grad_(True)
    sample = sample_shape(teacher)
    # under DDP each rank caches, initialises and trains on its share of the rows (BlockDistiller.local_rows):
    # n is a rank's share, the figures are per rank (host: the ranks of one node together)
    world = max(1, spec.world_size)
    n, cb, bs = math.ceil(spec.num_samples / world), distill.capture_batch_size, distill.batch_size
    chunks = [min(cb, n - start) for start in range(0, n, cb)]
    blocks = training_blocks(student, distill)
    names = [b for b in blocks if b != WHOLE_MODEL]
    params = sum(p.numel() for p in teacher.parameters())
    weights = _bytes(teacher.parameters()) + _bytes(teacher.buffers())
    student_bytes = _bytes(student.parameters()) + _bytes(student.buffers())
    resident = weights + student_bytes  # both models sit on the device for the whole of BKD
    # teacher_precision "bf16": the teacher's Linear / conv weights are stored in bf16 during BKD, their fp32
    # values on the host (BlockDistiller.store_teacher_in_bf16); calibration and fidelity use the fp32 teacher
    bf16 = getattr(distill, "teacher_precision", "fp32") == "bf16"
    halved = weights - _stored_bytes(teacher, bf16)
    bkd_resident = resident - halved

    offload = getattr(distill, "offload", False)
    if offload:
        teacher_blocks = [_stored_bytes(teacher.get_submodule(b), bf16) for b in names]
        student_blocks = [_stored_bytes(student.get_submodule(b), False) for b in names]
        teacher_rest = weights - halved - sum(teacher_blocks)
        student_rest = student_bytes - sum(student_blocks)
        largest_teacher, largest_student = max(teacher_blocks, default=0), max(student_blocks, default=0)

    def models_on_device(name: str) -> int:
        """What sits on the device while block `name` is prepared and trained: both models whole, or with
        offload (BlockDistiller.place_blocks) the code outside the blocks, the block being trained and one
        more student block and one teacher block moved in for a call (the whole student in the end-to-end
        stage)."""
        if not offload:
            return bkd_resident
        if name == WHOLE_MODEL:
            return student_bytes + teacher_rest + largest_teacher
        return student_rest + teacher_rest + 2 * largest_student + largest_teacher

    # a block's cache: per-row bytes of its batched inputs (from captures at 1 and 2 rows), shared inputs once
    def captures(rows: int) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]]]:
        inputs: dict[str, Any] = {}
        outputs: dict[str, list[torch.Tensor]] = {}
        batch = _meta_batch(rows, sample, spec, spec.num_steps)

        def pre(name):  # hooks return None: a value would replace the block's inputs or output
            def hook(module, args, kwargs):
                inputs.setdefault(name, (args, kwargs))
            return hook

        def post(name):
            def hook(module, args, output):
                outputs.setdefault(name, output_tensors(output))
            return hook

        # the whole model's block is the model's own call (dq.bkd.blocks.capture_block of WHOLE_MODEL)
        handles = [student.get_submodule(b).register_forward_pre_hook(pre(b), with_kwargs=True) for b in names]
        handles.append(student.register_forward_pre_hook(pre(WHOLE_MODEL), with_kwargs=True))
        handles += [teacher.get_submodule(b).register_forward_hook(post(b)) for b in names]
        handles.append(teacher.register_forward_hook(post(WHOLE_MODEL)))
        try:
            with torch.no_grad(), _step(student, batch):
                run_model(student, batch)
                run_model(teacher, batch)
        finally:
            for handle in handles:
                handle.remove()
        return inputs, outputs

    one_in, one_out = captures(1)
    two_in, two_out = captures(2)

    # the bytes a cache stores a value in: method.distill.cache_dtype for floating-point inputs and the targets
    store_size = 2 if getattr(distill, "cache_dtype", "fp32") == "bf16" else 4

    def stored(x: torch.Tensor) -> int:
        return x.numel() * (min(store_size, x.element_size()) if x.is_floating_point() else x.element_size())

    def cache_bytes(name: str) -> tuple[int, int]:
        io1, io2 = block_io(student, one_in[name], None), block_io(student, two_in[name], None)
        leaves1 = [(i, x) for i, x in enumerate(io1.leaves) if isinstance(x, torch.Tensor)]
        shared_in = sum(_bytes([x]) for i, x in leaves1 if i in io1.shared)
        b1 = sum(stored(x) for i, x in leaves1 if i not in io1.shared)
        b2 = sum(stored(x) for i, x in enumerate(io2.leaves) if isinstance(x, torch.Tensor) and i not in io2.shared)
        row_in, fixed_in = b2 - b1, 2 * b1 - b2
        row_out = sum(t.numel() * store_size for t in two_out[name]) - sum(t.numel() * store_size for t in one_out[name])
        fixed_out = sum(t.numel() * store_size for t in one_out[name]) - row_out
        inputs_total = n * row_in + len(chunks) * fixed_in + shared_in
        targets = n * row_out + len(chunks) * fixed_out if distill.iters_per_block > 0 else 0
        return inputs_total, targets

    # FLOPs of one row through the FP model, per block
    example = _meta_batch(1, sample, spec, spec.num_steps)
    root = type(teacher).__name__
    with torch.no_grad():
        model_flops, per_module = _flops(lambda: run_model(teacher, example))
    block_flops = {b: per_module.get(f"{root}.{b}", 0.0) for b in names}
    block_flops[WHOLE_MODEL] = model_flops

    # GPU: the phases' own peaks on meta, traced at 1 and 2 rows and extrapolated linearly in the rows (a trace
    # costs per operation, and tiled attention runs hundreds of chunks at the capture batch); attention tiles
    # are capped by their byte budget, so the line is an upper bound where tiling starts between 2 rows and
    # the batch
    def peak(fn) -> int:
        if not trace:
            return 0
        tracker = _Peak()
        with _FusedSDPA(), tracker:
            fn()
        return tracker.bytes

    lines: dict[Any, tuple[int, int]] = {}  # (what, model/block) -> its traced peaks at 1 and 2 rows

    def at_rows(trace, rows: int, key: Any = None) -> int:
        """The peak at `rows` rows on the line through the traces at 1 and 2 rows (kept under `key`)."""
        line = lines.get(key) if key is not None else None
        if line is None:
            line = (trace(1), trace(2))
            if key is not None:
                lines[key] = line
        one, two = line
        return max(one, two + (rows - 2) * (two - one)) if rows >= 2 else one

    def forward(model: nn.Module, rows: int, doubled: bool = False) -> int:
        def trace_rows(r: int) -> int:
            batch = _meta_batch(r, sample, spec, spec.num_steps)

            def run():
                with torch.no_grad(), _step(model, batch):
                    run_model(model, batch)

            return peak(run)

        return at_rows(trace_rows, rows * (2 if doubled else 1), ("forward", id(model)))

    generation = forward(teacher, spec.generation_batch_size, doubled=spec.guidance)

    def block_train(name: str, micro: int, cb: int) -> tuple[int, int]:
        """(peak of a training step at `micro` rows, peak of the initialisation pass at `cb` rows) of block
        `name`, beyond the resident models."""
        module = student if name == WHOLE_MODEL else student.get_submodule(name)
        inputs = {1: one_in, 2: two_in}

        def call(rows: int):
            batch = _meta_batch(rows, sample, spec, spec.num_steps)
            if name == WHOLE_MODEL:
                return batch, lambda: [run_model(student, batch)]
            args, kwargs = inputs[rows][name]
            return batch, lambda: output_tensors(module(*args, **kwargs))

        recompute = name == WHOLE_MODEL and distill.end_to_end_recompute

        def train_trace(rows: int) -> int:
            batch, run = call(rows)

            def step():
                with _step(student, batch), recomputed_blocks(student, names if recompute else []):
                    loss = sum(t.float().pow(2).mean() for t in run())
                loss.backward()  # outside the step context, as BlockDistiller.training_step
                for p in module.parameters():
                    p.grad = None

            return peak(step)

        def init_trace(rows: int) -> int:
            batch, run = call(rows)

            def observe():  # an observer passes its inputs through unquantized (dq.quant.calibrate_activations)
                set_quant_enabled(module, weights=True, activations=False)
                try:
                    with torch.no_grad(), _step(student, batch):
                        run()
                finally:
                    set_quant_enabled(module, weights=True, activations=True)

            return peak(observe)

        init = at_rows(init_trace, cb, ("init", name)) if act_quantizers(module) and name != WHOLE_MODEL else 0
        return at_rows(train_trace, micro, ("train", name)), init

    # Adam's state on the device per block (BlockDistiller.place_optimizer_state): the current block's; a
    # trained block's goes to the host while an end-to-end stage is to come (on a CPU run that is the device)
    trainables: dict[str, int] = {}
    optimizer_states: dict[str, int] = {}
    optimizer_state = 0
    for name in blocks:
        module = student if name == WHOLE_MODEL else student.get_submodule(name)
        trainables[name] = _trainable(module, distill.train_weights)
        if name == WHOLE_MODEL:
            optimizer_state = 2 * 4 * _trainable(student, distill.train_weights)
        elif spec.device == "cpu" and WHOLE_MODEL in blocks:
            optimizer_state += 2 * 4 * trainables[name]
        else:
            optimizer_state = 2 * 4 * trainables[name]
        optimizer_states[name] = optimizer_state

    # on a GPU, batch sizes whose phase would not fit the GPU are lowered (fit_batches): the capture and
    # initialisation batch, the training batch's passes (micro_batch_size) and the fidelity batch, each to the
    # largest power of two below the one set that fits
    micro = min(getattr(distill, "micro_batch_size", None) or bs, bs)
    fidelity_batch = spec.fidelity_batch_size
    limit = spec.gpu_bytes if fit_batches and trace and spec.device == "cuda" and spec.gpu_bytes else None

    def largest(start: int, need) -> int:
        rows = start
        while rows > 1 and need(rows) > limit:
            rows = 1 << ((rows - 1).bit_length() - 1)  # the next power of two below
        return rows

    if limit is not None:
        first = names[0] if names else WHOLE_MODEL
        cb = largest(cb, lambda r: models_on_device(first) + max(forward(teacher, r), forward(student, r),
                                                                 *(block_train(b, 1, r)[1] for b in blocks)))
        micro = largest(micro, lambda r: max(models_on_device(b) + optimizer_states[b] + block_train(b, r, 1)[0]
                                                            for b in blocks))
        fidelity_batch = largest(fidelity_batch, lambda r: resident + max(forward(teacher, r, spec.guidance),
                                                                          forward(student, r, spec.guidance)))
        chunks = [min(cb, n - start) for start in range(0, n, cb)]
    batch_sizes = {"capture": cb, "micro": micro, "fidelity": fidelity_batch}
    capture = max(forward(teacher, cb), forward(student, cb))
    sampling = max(forward(teacher, fidelity_batch, spec.guidance), forward(student, fidelity_batch, spec.guidance))

    # host: the calibration tuples and the guidance mix, held for the whole run (every rank loads them all)
    n_all = spec.num_samples
    x_row = math.prod(sample) * 4
    cond_row = 0 if spec.cond_shape is None else math.prod(spec.cond_shape) * torch.empty((), dtype=spec.cond_dtype).element_size()
    if spec.cond_shape:  # text embeddings: a table of one row per prompt (and the unconditional one), an index per tuple
        prompts = min(spec.num_prompts or spec.num_trajectories, spec.num_trajectories)
        cond_bytes = (prompts + spec.guidance) * cond_row + n_all * 8 * (2 if spec.guidance else 1)
    else:  # a class label per tuple (and the null class)
        cond_bytes = n_all * cond_row * (2 if spec.guidance else 1)
    calibration_file = n_all * (x_row + 16) + cond_bytes
    # the guidance mix: a new index (a table) or a new label tensor, beside the loaded tuples
    mix = (n_all * 8 if spec.cond_shape else n_all * cond_row) if spec.guidance and distill.uncond_fraction > 0 else 0
    tuples_host = calibration_file + mix

    plans: list[BlockPlan] = []
    target_budget = distill.target_cache_mb * MIB
    if distill.target_cache_mb == 0:
        target_budget = -1  # one block a pass
    sizes = {name: cache_bytes(name) for name in blocks}
    # each block's output over the N rows as it returns it (fp32), and which blocks read it: what the replay
    # carries forward (dq.bkd.blocks.BlockReplay)
    out_bytes = {b: n * (sum(t.numel() * 4 for t in two_out[b]) - sum(t.numel() * 4 for t in one_out[b])) for b in names}
    carrying = distill.replay_cache_mb > 0 and getattr(distill, "replay_spill", True)
    readers = block_readers(teacher, names, _meta_batch(2, sample, spec, spec.num_steps)) if carrying and names else {}
    # the teacher pass of a block captures the targets of the blocks after it that fit with it in
    # target_cache_mb (BlockDistiller.target_group), allocated whole when the pass starts
    groups: list[list[str]] = []
    start = 0
    while start < len(names):
        total, end = sizes[names[start]][1], start + 1
        while end < len(names) and total + sizes[names[end]][1] <= target_budget:
            total, end = total + sizes[names[end]][1], end + 1
        groups.append(names[start:end])
        start = end
    group_of = {b: g for g in groups for b in g}

    # each block's phases, then its cache's tier: "auto" puts a cache on the GPU when the block's GPU phases
    # with it stay within cache_gpu_fraction of the GPU, else on the host when the host can hold it beside
    # everything else, else on disk
    phases: dict[str, tuple[int, int, int, int]] = {}
    for name in blocks:
        train_peak, init_peak = block_train(name, micro, cb)
        phases[name] = (trainables[name], train_peak, init_peak, optimizer_states[name])
    # a CPU run's device is the host: the models and the phases' computation share it with the caches
    computing = max([capture, *(max(o + t, i) for _, t, i, o in phases.values())]) if spec.device == "cpu" else 0
    host_models = resident + halved if spec.device == "cpu" else 2 * halved  # (the fp32 copies of bf16 weights)
    if offload and spec.device == "cuda":  # the blocks that wait on the host
        host_models += bkd_resident - models_on_device(names[0] if names else WHOLE_MODEL)
    tiers: dict[str, str] = {}
    # a rank's share of the host (the ranks of a node split it)
    rank_spec = dataclasses.replace(spec, host_bytes=None if spec.host_bytes is None else spec.host_bytes // world)
    host_of: dict[str, int] = {}
    replay_host, replay_disk = carried_forward(names, out_bytes, readers, distill)
    for name in blocks:
        inputs_b, targets_b = sizes[name]
        _, train_peak, init_peak, optimizer_state = phases[name]
        # host beside the cache: the tuples, one capture chunk, the replay cache (and on a CPU run the models
        # and the computation); the targets captured ahead with this block's come on top
        chunk = math.ceil(inputs_b * min(cb, n) / n)
        host_of[name] = tuples_host + chunk + replay_host.get(name, 0)
        others = sum(sizes[b][1] for b in group_of.get(name, [name]) if b != name)
        tiers[name] = _cache_tier(distill, inputs_b + targets_b, rank_spec,
                                  models_on_device(name) + max(optimizer_state + train_peak, init_peak),
                                  host_of[name] + others + host_models + computing)

    for name in blocks:
        inputs_b, targets_b = sizes[name]
        trainable, train_peak, init_peak, optimizer_state = phases[name]
        tier = tiers[name]
        iters = distill.end_to_end_iters if name == WHOLE_MODEL and names else distill.iters_per_block
        on_gpu = inputs_b + targets_b if tier == "cuda" else 0
        plan = BlockPlan(name, inputs_b, targets_b, tier, trainable, train_peak)
        plan.replay_bytes = replay_host.get(name, 0) + replay_disk.get(name, 0)
        plan.gpu = {"capture": models_on_device(name) + capture, "init": models_on_device(name) + on_gpu + init_peak,
                    "train": models_on_device(name) + on_gpu + optimizer_state + train_peak}
        # targets of the block's teacher pass held on the host (a disk block's go to disk; a GPU block's
        # pass through the host on their way)
        ahead = sum(sizes[b][1] for b in group_of.get(name, [name]) if tiers.get(b) != "disk")
        held = {"cpu": inputs_b + targets_b, "cuda": targets_b, "disk": 0}[tier]
        plan.host = host_of[name] + held + (ahead - (targets_b if tier != "disk" else 0))
        prefix = model_flops if name == WHOLE_MODEL else sum(block_flops[b] for b in names[: names.index(name)])
        passes = 4 if name == WHOLE_MODEL and distill.end_to_end_recompute else 3  # forward, backward (2x), rerun
        if name == WHOLE_MODEL or not carrying:  # the student's prefix and the teacher's pass over all N rows
            prepare = n * (prefix + model_flops)
        else:  # carried forward: the block itself in the teacher's pass and in the replay recording, and the
            prepare = 2 * n * block_flops[name] + 2 * chunks[0] * prefix  # first chunk's checks in full
        plan.flops = {"capture": prepare, "init": n * block_flops[name],
                      "train": iters * bs * passes * block_flops[name] / world}
        plans.append(plan)

    gpu = {"load": weights, "calibration": weights + generation}
    for phase in ("capture", "init", "train"):
        values = [b.gpu[phase] for b in plans if b.name != WHOLE_MODEL]
        gpu[phase] = max(values, default=models_on_device(WHOLE_MODEL))
    if WHOLE_MODEL in blocks:
        whole = next(b for b in plans if b.name == WHOLE_MODEL)
        gpu["end_to_end"] = whole.gpu["train"]
    gpu["fidelity"] = resident + sampling
    host = {"load": 2 * weights, "calibration": tuples_host + 2 * calibration_file,
            "bkd": max((b.host for b in plans), default=0), "fidelity": tuples_host + resident}
    if spec.device == "cpu":  # the device is the host: the models and the phases' computation add to it
        host["calibration"] += weights + generation
        host["bkd"] += host_models + computing
        host["fidelity"] += sampling
    else:
        host["bkd"] += host_models
    host = {k: v * world for k, v in host.items()}  # every rank of the node holds its own
    steps_total = spec.num_trajectories * spec.num_steps * (2 if spec.guidance else 1)
    seconds = {
        "calibration": steps_total * model_flops / world,  # the trajectories are shared out
        "prepare": sum(b.flops["capture"] + b.flops["init"] for b in plans),
        "bkd": sum(b.flops["train"] for b in plans if b.name != WHOLE_MODEL),
        "end_to_end": sum(b.flops["train"] for b in plans if b.name == WHOLE_MODEL),
        "fidelity": 2 * spec.fidelity_samples * spec.num_steps * (2 if spec.guidance else 1) * model_flops,
    }
    seconds = {k: v / (spec.tflops * 1e12) for k, v in seconds.items()}
    seconds["total"] = sum(seconds.values())
    disk = world * max((b.cache_bytes * (b.cache_device == "disk") + replay_disk.get(b.name, 0) for b in plans), default=0)
    return Plan(spec, model_name or type(teacher).__name__, params, plans, gpu, host, disk, calibration_file, seconds,
                distill.end_to_end_recompute, batch_sizes)


def carried_forward(names: list[str], out_bytes: dict[str, int], readers: dict[str, frozenset[int]], distill
                    ) -> tuple[dict[str, int], dict[str, int]]:
    """Per block, the bytes of the outputs carried forward while it is prepared, (on the host, on disk): the
    outputs of the earlier blocks a block from this one on still reads, kept twice (the student's trained
    blocks and the teacher's, dq.bkd.BlockReplay), on the host up to replay_cache_mb and the rest on disk
    (replay_spill); nothing when the replay is off."""
    host: dict[str, int] = {}
    disk: dict[str, int] = {}
    if distill.replay_cache_mb == 0:
        return host, disk
    budget = int(distill.replay_cache_mb * MIB)
    for k, name in enumerate(names):
        live = 2 * sum(out_bytes[names[j]] for j in range(k) if max(readers.get(names[j], frozenset()), default=-1) >= k)
        host[name] = min(budget, live)
        disk[name] = max(0, live - budget) if getattr(distill, "replay_spill", True) else 0
    return host, disk


def _cache_tier(distill, cache: int, spec: PlanSpec, gpu_phases: int, host_beside: int) -> str:
    """The tier of a cache of `cache` bytes: cache_device's, or under "auto" the GPU when the block's GPU
    phases (`gpu_phases` without the cache) stay within cache_gpu_fraction of the GPU with it, else the host
    when the host can hold it beside `host_beside`, else disk."""
    setting = distill.cache_device
    if setting != "auto":
        return "cuda" if setting.startswith("cuda") else setting
    if spec.device == "cuda" and spec.gpu_bytes and gpu_phases + cache <= distill.cache_gpu_fraction * spec.gpu_bytes:
        return "cuda"
    if spec.host_bytes is None or host_beside + cache <= spec.host_bytes:
        return "cpu"
    return "disk"


# ---------------------------------------------------------------------------------------- budgets


def host_available_bytes() -> int | None:
    """The host memory available now (MemAvailable of /proc/meminfo), or None where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def measured_tflops(device: str, seconds: float = 0.3) -> float:
    """This machine's fp32 matmul rate on `device` (a 1024^3 GEMM repeated for about `seconds`), in TFLOP/s."""
    size = 1024
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    (a @ b).sum().item()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        count += 1
    c.sum().item()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12
