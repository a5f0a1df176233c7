"""An architecture description: what dq needs to know about a backbone family, as plain data.

    arch = describe(unet)          # the description of a diffusers UNet2DModel / UNet2DConditionModel
    arch.blocks                    # BKD's blocks, in the order a forward pass runs them
    arch.first_layers, arch.last_layers, arch.skip_splits, arch.attention

dq.quant's converter (precision policy, skip splits, quantized attention) and dq.bkd's block list read a
model's structure from here only; teaching dq a new backbone = one module that registers a describer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dq.errors import UnsupportedError, UserError


@dataclass(frozen=True)
class Architecture:
    """The structure of one model, by module name.

    family: the backbone family ("unet2d"), or "generic" for a model no description knows (layers only).
    blocks: BKD's blocks in execution order: modules each run exactly once per forward pass, together
      holding every Conv2d / Linear of the model (a layer outside any larger block is a block of its own).
    first_layers / last_layers: the layers the precision policy's first_layer_bits / last_layer_bits apply to.
    skip_splits: {layer name: channels of the first part of its input} for layers whose input is a
      concatenation [h, skip] (their two parts get separate activation quantizers).
    attention: the attention modules whose matmul inputs (q, k, v, softmax output) get quantized.
    quantize_attention: installs those quantizers on one attention module (the family's attention code).
    modulation_layers: the adaLN modulation linears (the shift / scale / gate of a transformer's norms), which
      the precision policy's modulation_bits applies to.
    shared_inputs: keyword arguments of the blocks, or of the model call (the whole-model block of
      end-to-end training), that carry no batch dimension (Flux's rotary embedding, its position ids): BKD's
      cache keeps one copy of them instead of slicing them per sample.
    """

    family: str
    blocks: tuple[str, ...] = ()
    first_layers: tuple[str, ...] = ()
    last_layers: tuple[str, ...] = ()
    skip_splits: dict[str, int] = field(default_factory=dict)
    attention: tuple[str, ...] = ()
    quantize_attention: Callable[..., None] | None = field(default=None, compare=False, repr=False)
    modulation_layers: tuple[str, ...] = ()
    shared_inputs: tuple[str, ...] = ()

    @property
    def is_generic(self) -> bool:
        return self.family == "generic"


ModelCall = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
SampleShape = Callable[[nn.Module], tuple[int, int, int]]

def has_layers(module: nn.Module | None) -> bool:
    """Whether `module` holds a Conv2d or Linear (a part the quantizer converts)."""
    return module is not None and any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def check_parts(model: nn.Module, known: tuple[str, ...], description: str) -> None:
    """UnsupportedError naming the children of `model` that hold layers and are not in `known`."""
    unknown = [n for n, child in model.named_children() if n not in known and has_layers(child)]
    if unknown:
        raise UnsupportedError(f"{type(model).__name__} has parts {description} does not know: {unknown}")


_DESCRIBERS: dict[str, Callable[[nn.Module], Architecture]] = {}
_CALLS: dict[str, ModelCall] = {}
_SHAPES: dict[str, SampleShape] = {}


def register(class_name: str, describer: Callable[[nn.Module], Architecture], call: ModelCall | None = None,
             sample_shape: SampleShape | None = None) -> None:
    """Make `describe` use `describer` for models of the class named `class_name`. call: the model's denoiser
    call, (model, x [B, C, H, W], timesteps [B], cond or None) -> the prediction [B, C, H, W] (cond: class
    labels int64 [B] or embeddings [B, L, D]); None: a diffusers UNet's, model(x, t) with cond passed as
    class_labels / encoder_hidden_states. sample_shape: (C, H, W) of the model's input x; None: the
    config's in_channels and sample_size."""
    _DESCRIBERS[class_name] = describer
    if call is not None:
        _CALLS[class_name] = call
    if sample_shape is not None:
        _SHAPES[class_name] = sample_shape


def sample_shape(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of one sample the denoiser takes (noise, calibration inputs): the registered shape of its
    class, or its config's in_channels and sample_size (an int or [height, width])."""
    shape = _SHAPES.get(type(model).__name__)
    if shape is not None:
        return shape(model)
    config = model.config
    size = getattr(config, "sample_size", None)
    if size is None:
        raise UnsupportedError(f"{type(model).__name__}'s config has no sample_size; dq cannot tell the sample shape")
    height, width = (size, size) if isinstance(size, int) else size
    return int(config.in_channels), int(height), int(width)


def cond_kwargs(cond: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The diffusers UNet keyword that carries `cond`: class_labels for int64 labels [B],
    encoder_hidden_states for embeddings [B, L, D], none for None."""
    if cond is None:
        return {}
    if not torch.is_floating_point(cond):
        return {"class_labels": cond}
    if cond.ndim != 3:
        raise UserError(f"float conditioning must be embeddings [B, L, D], got shape {tuple(cond.shape)}")
    return {"encoder_hidden_states": cond}


def model_call(model: nn.Module) -> ModelCall | None:
    """The registered denoiser call of `model`'s class (None: the UNet convention). Cheap: a table lookup."""
    return _CALLS.get(type(model).__name__)


def described_classes() -> list[str]:
    return sorted(_DESCRIBERS)


def describe(model: nn.Module, *, required: bool = False) -> Architecture:
    """The description of `model` by its class. A class no description knows gets a generic one (no
    blocks, no first/last layers, no skip splits, no attention), or UnsupportedError when `required`."""
    describer = _DESCRIBERS.get(type(model).__name__)
    if describer is not None:
        return describer(model)
    if required:
        raise UnsupportedError(
            f"dq has no architecture description of {type(model).__name__}; it knows {described_classes()}"
        )
    return Architecture("generic")
