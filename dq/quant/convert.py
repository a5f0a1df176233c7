"""The converter: a float model and its architecture description → its quantized student, and the model-level
controls of a student: the sampling step index, calibration, quantization on/off. The description comes from the
caller (`dq.arch.describe`), so the quantization core imports no architecture code and no diffusers.

    student = quantize_model(unet, QuantConfig(weight_bits=4, act_bits=4, num_steps=25, num_groups=25), describe(unet))
    with calibrate_activations(student):
        for batch in calibration_batches:
            set_step(student, batch["step"])           # int64 [B]: one step index per sample
            student(batch["x_t"], batch["timestep"])
    set_step(student, 3)                               # sampling: one step index for the whole batch
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

import torch
from torch import nn

from dq.errors import UserError
from dq.quant.config import QuantConfig
from dq.quant.layers import QuantConv2d, QuantLinear
from dq.quant.quantizers import StepIndexed, TemporalActQuantizer, WeightQuantizer

CONFIG_ATTR = "dq_quant_config"


class ModelLayout(Protocol):
    """What the converter reads from a model's architecture description, by module name (`dq.arch.Architecture`
    is one: `dq.arch.describe(model)`; it gives a layers-only description for a class it does not know)."""

    first_layers: tuple[str, ...]  # take config.first_layer_bits
    last_layers: tuple[str, ...]  # take config.last_layer_bits
    modulation_layers: tuple[str, ...]  # take config.modulation_bits
    skip_splits: Mapping[str, int]  # {layer: channels of the first part of its concatenated input}
    attention: tuple[str, ...]  # the attention modules whose matmul inputs get quantized
    quantize_attention: Callable[[nn.Module, QuantConfig], None] | None  # installs a dq.quant.attention processor


def is_quantized(model: nn.Module) -> bool:
    return isinstance(getattr(model, CONFIG_ATTR, None), QuantConfig)


def quant_config(model: nn.Module) -> QuantConfig:
    """The QuantConfig a student was built with; ValueError for a model that is not a dq student."""
    config = getattr(model, CONFIG_ATTR, None)
    if not isinstance(config, QuantConfig):
        raise UserError(f"{type(model).__name__} is not a dq quantized model (no {CONFIG_ATTR})")
    return config


def _selected(name: str, config: QuantConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in config.include) and not any(
        fnmatch.fnmatchcase(name, p) for p in config.exclude
    )


def quantize_model(model: nn.Module, config: QuantConfig, arch: ModelLayout, inplace: bool = False) -> nn.Module:
    """Turn a float diffusion model into its quantized student (docs/method.md §1-§3).

    Every nn.Conv2d / nn.Linear selected by config.include/exclude becomes a QuantConv2d / QuantLinear
    (WD applied, weight quantizer initialised from the weight). The model's architecture description `arch`
    (`dq.arch.describe(model)`) says which layers take the first/last/modulation layer bits, which inputs are
    skip concatenations to split (config.split_skip), and which attention modules get quantized matmul inputs
    (config.quantize_attention). Activation (TPQ) tables still need calibration data: see
    `calibrate_activations`. Returns the student (the same object if inplace).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a dq.quant.QuantConfig, got {type(config).__name__}")
    if is_quantized(model) or any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules()):
        raise UserError("model is already quantized; convert the float model instead")
    student = model if inplace else copy.deepcopy(model)
    selected = [(name, module) for name, module in student.named_modules()
                if isinstance(module, (nn.Conv2d, nn.Linear)) and _selected(name, config)]
    targets = [(name, module) for name, module in selected if _computes_as_its_base(module)]
    refused = [f"{name} ({type(module).__name__})" for name, module in selected if not _computes_as_its_base(module)]
    if refused:  # a subclass with a forward of its own (a LoRA layer, a custom projection): dq cannot mirror it
        shown = ", ".join(refused[:4]) + (f" and {len(refused) - 4} more" if len(refused) > 4 else "")
        raise UserError(f"{len(refused)} layer(s) subclass nn.Conv2d / nn.Linear with a computation of their own, "
                        f"which a quantized layer would not run: {shown}; merge them into plain layers, or keep "
                        "them in float with quant.exclude=[<their names>]")
    if not targets:
        raise UserError(
            f"no Conv2d/Linear layer matches include={list(config.include)} exclude={list(config.exclude)}"
        )
    for name, module in targets:
        _replace_layer(student, name, module, config, arch)
    if config.quantize_attention and arch.quantize_attention is not None:
        for name in arch.attention:
            if _selected(name, config):
                arch.quantize_attention(student.get_submodule(name), config)
    setattr(student, CONFIG_ATTR, config)
    return student


def _computes_as_its_base(module: nn.Module) -> bool:
    """Whether a Conv2d / Linear (or a subclass of one) computes exactly what its base class computes: the
    same forward, only a weight and a bias, no child modules; then its quantized twin replaces it."""
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    methods = ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",)
    return (all(getattr(type(module), m) is getattr(base, m) for m in methods)
            and set(module._parameters) <= {"weight", "bias"} and not module._modules)


def _replace_layer(student: nn.Module, name: str, module: nn.Module, config: QuantConfig, arch: ModelLayout) -> None:
    """Put the quantized version of layer `name` in its place, with its bits by the precision policy."""
    weight_bits, act_bits = config.weight_bits, config.act_bits
    special = (*arch.first_layers, *arch.last_layers, *arch.modulation_layers)
    token_wise = isinstance(module, nn.Linear) and name not in special  # rotation and low-rank branch candidates
    if name in arch.first_layers and config.first_layer_bits is not None:
        weight_bits = act_bits = config.first_layer_bits
    if name in arch.last_layers and config.last_layer_bits is not None:
        weight_bits = act_bits = config.last_layer_bits
    if name in arch.modulation_layers and config.modulation_bits is not None:
        weight_bits = act_bits = config.modulation_bits
    if any(fnmatch.fnmatchcase(name, p) for p in config.promote_layers):
        act_bits = max(act_bits, config.promote_bits)
    split_at = arch.skip_splits.get(name) if config.split_skip else None
    quant_cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    quantized = quant_cls.from_float(module, weight_bits, act_bits, config, split_at, token_wise)
    parent_name, _, short = name.rpartition(".")
    setattr(student.get_submodule(parent_name) if parent_name else student, short, quantized)


# ---------------------------------------------------------------------------- model-level controls


def act_quantizers(model: nn.Module) -> list[TemporalActQuantizer]:
    return [m for m in model.modules() if isinstance(m, TemporalActQuantizer)]


def weight_quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in model.modules() if isinstance(m, WeightQuantizer)]


def step_indexed(model: nn.Module) -> list[StepIndexed]:
    """Every module of `model` that reads the sampling step index (TPQ quantizers, trainable or integer)."""
    return [m for m in model.modules() if isinstance(m, StepIndexed)]


def tpq_num_steps(model: nn.Module) -> int | None:
    """T, the number of sampling steps the student's TPQ tables serve; None for a float model."""
    quantizers = step_indexed(model)
    return quantizers[0].num_steps if quantizers else None


def set_step(model: nn.Module, step: int | torch.Tensor | None) -> None:
    """Set the sampling step index on every TPQ quantizer of `model` (eq. 13-14).

    step: an int i in [0, T) for a whole batch (sampling), an int64 tensor [B] of per-sample indices
    (parallel training), or None to clear. A no-op on a float model. ValueError if out of range.
    """
    quantizers = step_indexed(model)
    if not quantizers:
        return
    num_steps = quantizers[0].num_steps
    if isinstance(step, torch.Tensor):
        if step.ndim == 0:
            step = int(step)
        elif step.ndim != 1 or step.dtype not in (torch.int64, torch.int32):
            raise UserError(f"per-sample step indices must be an int64 tensor [B], got {step.dtype} {tuple(step.shape)}")
        else:
            step = step.long().to(quantizers[0].step_to_group.device)
            if not step.is_meta and (step.numel() == 0 or int(step.min()) < 0 or int(step.max()) >= num_steps):
                raise UserError(
                    f"step indices must lie in [0, {num_steps}) for TPQ tables built for {num_steps} sampling "
                    f"steps, got range [{int(step.min()) if step.numel() else '-'}, "
                    f"{int(step.max()) if step.numel() else '-'}]"
                )
    if isinstance(step, bool) or (step is not None and not isinstance(step, (int, torch.Tensor))):
        raise UserError(f"step must be an int, an int64 tensor [B] or None, got {type(step).__name__}")
    if isinstance(step, int) and not 0 <= step < num_steps:
        raise UserError(
            f"step index {step} is out of range: this student's TPQ tables were built for {num_steps} "
            f"sampling steps (indices 0..{num_steps - 1}); sample with the same number of steps"
        )
    for quantizer in quantizers:
        quantizer.step = step


@contextlib.contextmanager
def step_context(model: nn.Module, step: int | torch.Tensor) -> Iterator[None]:
    """`with step_context(model, i):` sets the step index for the block and clears it afterwards."""
    set_step(model, step)
    try:
        yield
    finally:
        set_step(model, None)


@contextlib.contextmanager
def calibrate_activations(model: nn.Module, seed: int = 0) -> Iterator[list[TemporalActQuantizer]]:
    """Observe activations of the forward passes run inside the block, then initialise every TPQ table of
    `model` (a student or any sub-module of one) per group. Inputs pass through unquantized meanwhile,
    so each layer sees the values it would see with quantized predecessors only if those were already
    calibrated outside this block (BKD calibrates block by block for that reason)."""
    quantizers = act_quantizers(model)
    if not quantizers:
        raise UserError(f"{type(model).__name__} has no activation quantizers to calibrate")
    for quantizer in quantizers:
        quantizer.start_observing(seed)
    completed = False
    try:
        yield quantizers
        completed = True
    finally:
        if completed:
            for quantizer in quantizers:
                quantizer.finish_observing()
        else:  # an exception inside the block: leave the tables as they were
            for quantizer in quantizers:
                quantizer.cancel_observing()


def merge_observations(quantizers: Iterable[TemporalActQuantizer], seed: int = 0) -> None:
    """Inside calibrate_activations, under torch.distributed: make every quantizer's observations those of all
    processes together (each observed its share of the calibration rows), so that finish_observing sets the
    same tables on every process: min/max exactly, the search-based inits on the processes' samples together.
    Nothing to do in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return

    def gather(obj):
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    for quantizer in quantizers:
        quantizer.merge_observed(gather, seed)


@contextlib.contextmanager
def activation_drop(model: nn.Module, prob: float, generator: torch.Generator | None = None) -> Iterator[None]:
    """`with activation_drop(block, p, gen):` every activation quantizer of `model` passes each element of
    its input unquantized with probability p (masks drawn from `generator`), and quantizes the rest; outside
    the block, p is 0 again. BKD's training steps use it with method.distill.act_drop (a QDrop-style
    option; the inference path never drops)."""
    if not 0.0 <= prob < 1.0:
        raise UserError(f"the activation drop probability must lie in [0, 1), got {prob}")
    quantizers = act_quantizers(model)
    for quantizer in quantizers:
        quantizer.drop_prob, quantizer.drop_generator = prob, generator
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.drop_prob, quantizer.drop_generator = 0.0, None


def lowrank_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The layers of `model` that carry a low-rank branch (QuantConfig.lowrank_rank), by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and getattr(m, "lowrank_down", None) is not None}


@torch.no_grad()
def set_lowrank_scale(model: nn.Module, value: float) -> None:
    """Set λ, the weight of every low-rank branch in `model` (a decaying branch: 1 at first, 0 when done)."""
    for layer in lowrank_layers(model).values():
        layer.lowrank_scale.fill_(value)


def drop_lowrank(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Remove the low-rank branches of the layers `names` of `model` (all of them by default); their names."""
    layers = lowrank_layers(model)
    chosen = list(layers) if names is None else [n for n in names if n in layers]
    for name in chosen:
        layers[name].drop_lowrank()
    return chosen


def drop_lowrank_absent(model: nn.Module, keys: Iterable[str], prefix: str = "") -> list[str]:
    """Remove the branches of `model` that a saved state's `keys` (state_dict names under `prefix`) lack: those a
    decaying student dropped when their blocks ended, so that the state loads into it."""
    keys = set(keys)
    return drop_lowrank(model, [n for n in lowrank_layers(model) if f"{prefix}{n}.lowrank_down" not in keys])


def set_quant_enabled(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Switch fake quantization of weights and/or activations on or off (off = float path, WD kept)."""
    for quantizer in weight_quantizers(model):
        quantizer.enabled = weights
    for quantizer in act_quantizers(model):
        quantizer.enabled = activations
