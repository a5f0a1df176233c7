"""The integer model under torch.compile: Inductor fuses each activation quantizer with what precedes it
(GroupNorm, SiLU, the residual add) into one pass, and turns the oneDNN integer convolutions (linears run as
1×1 convolutions) into calls on weights it packed once (`onednn.qconv_pointwise` with the current step's
scale and zero point as runtime tensors).

    int_model = compile_int_model(load_int_model("student.safetensors"))              # float32 between layers
    int_model = compile_int_model(load_int_model("student.safetensors"), glue="bf16")  # bfloat16 between layers

The sampling step reaches the TPQ tables as a tensor input of the compiled graph, so one graph serves every
step of a schedule (an int step would be a constant of the graph: one compilation per step). The timestep
keying and the checks on the step stay outside the graph, in eager Python. A call with a smaller batch than
one already compiled runs padded to it (its last row repeated, the extra rows dropped from the output), so
the short last batch of a sampling run does not compile a second graph. With `glue="bf16"` the float
parts (normalisations, attention, the residual stream) run in bfloat16 and the integer layers write
bfloat16; activation codes are still computed in float32, and the output is returned in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dq.errors import UserError
from dq.quant.convert import step_indexed
from dq.quant.quantizers import StepBlend
from dq.quant.timesteps import timestep_keying

GLUE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512_BF16 or AMX). Without it, bfloat16 glue is
    emulated: on a 2-core AVX2 EPYC the compiled ddpm-cifar10 W4A4 model took 86 s a forward with it, 0.57 s
    with float32 glue (bench/bench_int.py, batch 8, docs/benchmarks.md)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class CompiledIntModel(nn.Module):
    """An integer model (`load_int_model`) compiled with Inductor (frozen weights); called like the model.

    The wrapped model is `.model`; its parameters are cast in place for `glue="bf16"`. Attributes the wrapper
    does not have (a diffusers model's `config`, ...) are the wrapped model's."""

    def __init__(self, model: nn.Module, glue: str = "fp32") -> None:
        super().__init__()
        if glue not in GLUE:
            raise UserError(f"glue must be one of {sorted(GLUE)}, got {glue!r}")
        self.model = model
        self.glue = glue
        self._quantizers = step_indexed(model)
        if not self._quantizers:
            raise UserError(f"{type(model).__name__} has no TPQ tables: compile_int_model takes an integer model")
        backend = getattr(model, "dq_export", {}).get("backend", "onednn")
        if backend != "onednn":
            raise UserError(f"the compiled integer model runs oneDNN's CPU kernels; this one runs the {backend} backend "
                            "here (leave it uncompiled on a GPU)")
        if glue == "bf16" and not native_bf16():
            raise UserError("glue='bf16' needs a CPU with native bfloat16 (AVX512_BF16 or AMX); this one emulates "
                            "it, about 150x slower than float32 glue: use glue='fp32'")
        if glue == "bf16":
            for param in model.parameters():  # float layers; integer layers keep their tables and biases
                param.data = param.data.to(torch.bfloat16)
        self._compiled = torch.compile(self._run, dynamic=False)
        self._batches: set[int] = set()  # the batch sizes compiled so far

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what it takes and returns

    def forward(self, *args, **kwargs):
        saved = [q.step for q in self._quantizers]
        step = saved[0]
        if step is None:  # keyed by timestep: resolved (and checked) here, outside the graph
            keying = timestep_keying(self.model)
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
            if keying is None or timestep is None:
                raise UserError("set the sampling step (dq.quant.set_step) or key the model by timestep before calling it")
            step = keying.resolve(timestep)
        step = _one_step(step, self._quantizers[0].step_to_group)
        batch = _batch_size(args, kwargs)
        compiled_batch = min((b for b in self._batches if batch is not None and b >= batch), default=batch)
        if compiled_batch != batch:  # rows are independent: pad to a compiled batch rather than compile again
            args = _pad_rows(args, batch, compiled_batch)
            kwargs = {k: v if k.endswith("_ids") else _pad_rows(v, batch, compiled_batch) for k, v in kwargs.items()}
        elif batch is not None:
            self._batches.add(batch)
        try:
            # freezing: weights become constants of the graph (the packing folds into them); the flag is read
            # while tracing, outside the compiler's own options, so it is set around the call
            with torch.no_grad(), torch._inductor.config.patch(freezing=True):
                output = self._compiled(step, args, kwargs)
            return output if compiled_batch == batch else _first_rows(output, compiled_batch, batch)
        finally:
            for quantizer, value in zip(self._quantizers, saved):
                quantizer.step = value

    def _run(self, step: torch.Tensor | StepBlend, args: tuple, kwargs: dict):
        for quantizer in self._quantizers:
            quantizer.step = step
        if self.glue != "fp32":  # inputs in the glue's dtype, the timestep as given (diffusers embeds it in float32)
            dtype = GLUE[self.glue]
            args = tuple(a.to(dtype) if _is_float(a) and i != 1 else a for i, a in enumerate(args))
            kwargs = {k: v.to(dtype) if _is_float(v) and k != "timestep" else v for k, v in kwargs.items()}
        return _to_float32(self.model(*args, **kwargs))


def compile_int_model(model: nn.Module, glue: str = "fp32") -> CompiledIntModel:
    """`model` (an integer model) compiled with Inductor; glue: "fp32" or "bf16", the dtype between layers.
    The first call at a new input shape compiles (tens of seconds to minutes on a small CPU); a smaller batch
    than one compiled runs padded to it instead."""
    return CompiledIntModel(model, glue)


def _one_step(step: int | torch.Tensor | StepBlend, step_to_group: torch.Tensor) -> torch.Tensor | StepBlend:
    """The step of a call as tensors of one row: the integer model runs one sampling step per call."""
    if isinstance(step, StepBlend):
        if step.weight.numel() != 1:
            raise UserError("the integer model runs one sampling step per call; got per-sample interpolated steps")
        return step
    if isinstance(step, int):
        return torch.tensor([step], device=step_to_group.device)
    step = step.reshape(-1).to(step_to_group.device)
    groups = step_to_group.index_select(0, step)
    if step.numel() > 1 and not bool((groups == groups[:1]).all()):
        raise UserError("the integer model runs one sampling step per call; got per-sample step indices of "
                        f"several TPQ groups {sorted(set(groups.tolist()))}")
    return step[:1]


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch of a call: the first dimension of its first tensor argument (the sample)."""
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else None


def _pad_rows(value: Any, batch: int, size: int) -> Any:
    """`value` with every tensor whose first dimension is `batch` grown to `size` rows by repeating its last row
    (inside tuples, lists and dicts: diffusers' added_cond_kwargs). The caller leaves out the position ids of
    a call (`img_ids`, `txt_ids`: rows of tokens, not of samples)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value, value[-1:].expand(size - batch, *value.shape[1:])])
    if isinstance(value, (tuple, list)):
        return type(value)(_pad_rows(v, batch, size) for v in value)
    if isinstance(value, dict):
        return {k: _pad_rows(v, batch, size) for k, v in value.items()}
    return value


def _map_output(output: Any, fn) -> Any:
    """`fn` applied to the output tensor(s) of a model call: a tensor, a tuple of them, or a diffusers output
    dataclass's `.sample`."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return tuple(_map_output(o, fn) for o in output)
    if hasattr(output, "sample") and isinstance(output.sample, torch.Tensor):  # a diffusers output dataclass
        output.sample = fn(output.sample)
    return output


def _first_rows(output: Any, size: int, batch: int) -> Any:
    """A padded call's output cut back to the call's `batch` rows."""
    return _map_output(output, lambda t: t[:batch] if t.dim() > 0 and t.shape[0] == size else t)


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _to_float32(output: Any) -> Any:
    return _map_output(output, lambda t: t.float() if t.is_floating_point() else t)
