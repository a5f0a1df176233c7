"""The integer export: one versioned, self-describing safetensors file that holds a student as a low-bit model.

Tensors (per quantized layer NAME; per attention processor PROC):
    NAME.weight_codes          packed weight codes q_w ∈ [0, 2^b − 1] (two 4-bit codes a byte; dq.export.packing)
    NAME.weight_scale          float32 [C_out]  Δw
    NAME.weight_zero_point     int16 [C_out]    z_w (rounded, as the student's fake quantizer uses it)
    NAME.wd_scale              float32 [C_in]   Weight Dilation's s (only when the student used WD)
    NAME.bias                  float (float_dtype) [C_out]
    NAME.act.{0,1}.scale       float32 [G]      the TPQ table Δx (part 1 = the skip half of a split input)
    NAME.act.{0,1}.zero_point  int16 [G]        z_x
    PROC.{q,k,v,probs}.scale / .zero_point       attention matmul input tables
    step_to_group              int16 [T]        sampling step index → TPQ group
    float.KEY                  every other tensor of the UNet's state_dict (norms, embeddings, the biases and
                               weights of layers left in float), in float_dtype
Metadata: format, format_version, the UNet class and config, the attention head counts, the quant config
(the precision policy), the per-layer bits and input splits, the trained schedule's timesteps, and whatever the
exporter adds (sampler, model config, method, the source run).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dq.arch import attention_heads
from dq.errors import UserError
from dq.export.packing import pack_codes, packed_numel, unpack_codes
from dq.io import atomic_write
from dq.quant import QuantAttnProcessor, QuantConfig, TokenActQuantizer, quant_config
from dq.quant.layers import QuantConv2d, QuantLinear

FORMAT_NAME = "dq-int-export"
FORMAT_VERSION = 1
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ATTN_QUANTIZERS = ("q", "k", "v", "probs")


class ExportError(UserError):
    """An export that cannot be written or read: the message names the file or value and what to do."""


@dataclass
class IntLayerSpec:
    """One quantized Conv2d / Linear of an export, as the runtime needs it."""

    name: str
    kind: str  # "conv2d" | "linear"
    weight_bits: int
    act_bits: int
    weight_shape: tuple[int, ...]
    splits: list[int]  # input-channel widths of the parts (one part, or [h, skip] for a split input)
    weight_int: torch.Tensor  # int32 q_w − z_w, weight_shape
    weight_scale: torch.Tensor
    wd_scale: torch.Tensor | None
    bias: torch.Tensor | None
    act_tables: list[tuple[torch.Tensor, torch.Tensor]]  # per part: (Δx [G], z_x [G]); per token: (α [G], zeros)
    act_granularity: str = "tensor"  # "token": the input quantized per token, the table its clip ratios
    rotation_signs: torch.Tensor | None = None  # the input rotation's signs [C_in] (dq.quant.rotation), if any
    rotation_block: int = 1
    lowrank_down: torch.Tensor | None = None  # a kept low-rank branch's A [r, C_in] (float), if any
    lowrank_up: torch.Tensor | None = None  # and its B [C_out, r], λ folded in


@dataclass
class Export:
    """A read export: its metadata and tensors, validated."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(self.metadata["quant_config"])

    @property
    def timesteps(self) -> list[int]:
        return list(self.metadata["timesteps"])

    def layer_specs(self) -> list[IntLayerSpec]:
        return [self._layer_spec(name, info) for name, info in self.metadata["layers"].items()]

    def _layer_spec(self, name: str, info: dict[str, Any]) -> IntLayerSpec:
        t = self.tensors
        shape = tuple(info["weight_shape"])
        numel = 1
        for dim in shape:
            numel *= dim
        codes = unpack_codes(t[f"{name}.weight_codes"], info["weight_bits"], numel).reshape(shape)
        zero_point = t[f"{name}.weight_zero_point"].to(torch.int32)
        weight_int = codes - zero_point.view(-1, *([1] * (len(shape) - 1)))
        tables = [(t[f"{name}.act.{i}.scale"].float(), t[f"{name}.act.{i}.zero_point"].to(torch.int32))
                  for i in range(len(info["splits"]))]
        bias = t.get(f"{name}.bias")
        block = int(info.get("rotation_block", 1))  # files before the activation options: none
        lowrank = int(info.get("lowrank_rank", 0))
        return IntLayerSpec(name, info["kind"], info["weight_bits"], info["act_bits"], shape, list(info["splits"]),
                            weight_int, t[f"{name}.weight_scale"].float(), t.get(f"{name}.wd_scale"),
                            None if bias is None else bias.float(), tables, info.get("act_granularity", "tensor"),
                            t[f"{name}.rotation_signs"].float() if block > 1 else None, block,
                            t[f"{name}.lowrank_down"].float() if lowrank else None,
                            t[f"{name}.lowrank_up"].float() if lowrank else None)

    def attention_tables(self, processor: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {q: (self.tensors[f"{processor}.{q}.scale"].float(), self.tensors[f"{processor}.{q}.zero_point"].to(torch.int32))
                for q in ATTN_QUANTIZERS}

    def float_state(self) -> dict[str, torch.Tensor]:
        """The UNet's float tensors (state_dict keys), back in float32 where they are floating point."""
        return {k[len("float."):]: (v.float() if torch.is_floating_point(v) else v)
                for k, v in self.tensors.items() if k.startswith("float.")}


# ------------------------------------------------------------------------------------------- writing


def _rounded(zero_point: torch.Tensor) -> torch.Tensor:
    return torch.round(zero_point.detach()).to(torch.int16)


def _weight_codes(layer: QuantConv2d | QuantLinear) -> torch.Tensor:
    """The student's weight codes, computed as its fake quantizer computes them (same ops, same order)."""
    quantizer = layer.weight_quantizer
    view = [-1] + [1] * (layer.weight.ndim - 1)
    scale = quantizer.scale.detach().reshape(view)
    zero_point = torch.round(quantizer.zero_point.detach()).reshape(view)
    return torch.clamp(torch.round(layer.weight.detach() / scale) + zero_point, 0, 2**quantizer.bits - 1).to(torch.int32)


def _check_positive(name: str, scale: torch.Tensor) -> None:
    if not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
        raise ExportError(f"{name} has a step size that is not a positive finite number (min {float(scale.min()):.3g}); "
                          "the student cannot be exported")


def act_table(prefix: str, quantizer) -> dict[str, torch.Tensor]:
    """The TPQ table tensors of one calibrated activation quantizer: PREFIX.scale (Δx) and PREFIX.zero_point."""
    if not quantizer.enabled or not bool(quantizer.calibrated):
        raise ExportError(f"activation quantizer {prefix} is switched off or was never calibrated; export a trained run")
    _check_positive(prefix, quantizer.scale.detach())
    return {f"{prefix}.scale": quantizer.scale.detach().float().contiguous(),
            f"{prefix}.zero_point": _rounded(quantizer.zero_point)}


def input_quantizers(module: QuantConv2d | QuantLinear) -> list:
    """A quantized layer's activation quantizers, one per input part (two for a split skip input)."""
    return [module.act_quantizer] + ([module.skip_act_quantizer] if module.split_at is not None else [])


def layer_export(name: str, module: QuantConv2d | QuantLinear, float_dtype: str = "float32",
                 weight_dilation: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, layer info) of one quantized layer's weight side: packed codes, Δw, z_w, WD's s, the bias."""
    quantizer = module.weight_quantizer
    if getattr(module, "groups", 1) != 1:
        raise ExportError(f"{name} is a grouped convolution (groups={module.groups}); the integer runtime has no "
                          "grouped kernel yet")
    if not quantizer.enabled:
        raise ExportError(f"the weight quantizer of {name} is switched off; export a trained run")
    if quantizer.bits > 8 or module.act_quantizer.bits > 8:
        raise ExportError(f"{name} is quantized at more than 8 bits; integer execution takes ≤ 8-bit layers")
    _check_positive(f"{name}.weight_quantizer", quantizer.scale.detach())
    tensors = {
        f"{name}.weight_codes": pack_codes(_weight_codes(module), quantizer.bits),
        f"{name}.weight_scale": quantizer.scale.detach().float().contiguous(),
        f"{name}.weight_zero_point": _rounded(quantizer.zero_point),
    }
    if weight_dilation:
        tensors[f"{name}.wd_scale"] = module.wd_scale.detach().float().contiguous()
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().to(FLOAT_DTYPES[float_dtype]).contiguous()
    in_channels = module.weight.shape[1]
    info = {
        "kind": "conv2d" if isinstance(module, QuantConv2d) else "linear",
        "weight_bits": quantizer.bits, "act_bits": module.act_quantizer.bits,
        "weight_shape": list(module.weight.shape),
        "splits": [in_channels] if module.split_at is None else [module.split_at, in_channels - module.split_at],
    }
    if isinstance(module.act_quantizer, TokenActQuantizer):
        info["act_granularity"] = "token"
    if getattr(module, "rotation_signs", None) is not None:  # the weight codes are of the rotated weight already
        info["rotation_block"] = module.rotation_block
        tensors[f"{name}.rotation_signs"] = module.rotation_signs.detach().float().contiguous()
    if getattr(module, "lowrank_down", None) is not None:  # a kept branch (a decayed one was dropped): λ into B
        dtype = FLOAT_DTYPES[float_dtype]
        info["lowrank_rank"] = module.lowrank_down.shape[0]
        tensors[f"{name}.lowrank_down"] = module.lowrank_down.detach().to(dtype).contiguous()
        tensors[f"{name}.lowrank_up"] = (module.lowrank_up.detach().float() * module.lowrank_scale.float()
                                         ).to(dtype).contiguous()
    return tensors, info


def export_tensors(student: nn.Module, float_dtype: str = "float32") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata fields) of a student (see the module docstring); ExportError for a model that is not a
    calibrated dq student or has a quantizer switched off."""
    try:
        config = quant_config(student)
    except ValueError as err:
        raise ExportError(f"only a quantized student can be exported: {err}") from err
    if float_dtype not in FLOAT_DTYPES:
        raise ExportError(f"float_dtype must be one of {sorted(FLOAT_DTYPES)}, got {float_dtype!r}")
    if config.attn_granularity != "tensor":
        raise ExportError("the integer runtime quantizes the attention's q and k per tensor; this student was trained "
                          "with attn_granularity='token': evaluate it as a fake-quantized student (evaluate.py) "
                          "instead, or train it with quant.attn_granularity=tensor")
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    attention: dict[str, Any] = {}
    claimed: set[str] = set()
    step_to_group = None

    def table(prefix: str, quantizer) -> None:
        nonlocal step_to_group
        tensors.update(act_table(prefix, quantizer))
        if step_to_group is None:
            step_to_group = quantizer.step_to_group
        elif not torch.equal(step_to_group, quantizer.step_to_group):
            raise ExportError("the student's activation quantizers use different step→group maps")

    for name, module in student.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)):
            layer_tensors, layers[name] = layer_export(name, module, float_dtype, config.weight_dilation)
            tensors.update(layer_tensors)
            for i, part in enumerate(input_quantizers(module)):
                table(f"{name}.act.{i}", part)
            claimed.update(f"{name}.{key}" for key in module.state_dict())
        elif isinstance(module, QuantAttnProcessor):
            for short in ATTN_QUANTIZERS:
                table(f"{name}.{short}", getattr(module, f"{short}_quantizer"))
            attention[name] = {"qkv_bits": module.q_quantizer.bits, "softmax_bits": module.probs_quantizer.bits,
                               "processor": type(module).__name__}
            claimed.update(f"{name}.{key}" for key in module.state_dict())
    if not layers:
        raise ExportError("the student has no quantized Conv2d/Linear layer to export")
    for key, value in student.state_dict().items():
        if key in claimed:
            continue
        value = value.detach()
        tensors[f"float.{key}"] = (value.to(FLOAT_DTYPES[float_dtype]) if torch.is_floating_point(value) else value).contiguous()
    tensors["step_to_group"] = step_to_group.to(torch.int16)
    fields = {"quant_config": config.to_dict(), "layers": layers, "attention": attention,
              "attention_heads": attention_heads(student), "float_dtype": float_dtype}
    return tensors, fields


def export_student(student: nn.Module, path: str | os.PathLike, timesteps: list[int], float_dtype: str = "float32",
                   extra: dict[str, Any] | None = None) -> Path:
    """Write the student's integer export to `path` (written to a temporary file and renamed into place).

    timesteps: the trained schedule (one per step index, in call order); extra: more metadata (JSON values).
    ExportError when the student cannot be exported or the timesteps do not fit its TPQ tables.
    """
    tensors, fields = export_tensors(student, float_dtype)
    config = quant_config(student)
    timesteps = [int(t) for t in timesteps]
    if len(timesteps) != config.num_steps:
        raise ExportError(f"{len(timesteps)} timesteps given for TPQ tables of {config.num_steps} sampling steps")
    unet_config = {k: v for k, v in dict(student.config).items() if not k.startswith("_")} if hasattr(student, "config") else None
    if unet_config is None:
        raise ExportError(f"{type(student).__name__} has no diffusers config; only diffusers UNets are exported")
    metadata = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "unet_class": type(student).__name__,
        "unet_config": unet_config, "timesteps": timesteps, **fields, **(extra or {}),
    }
    encoded = {k: json.dumps(v, sort_keys=True, default=_json_default) for k, v in metadata.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=encoded))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON")


# ------------------------------------------------------------------------------------------- reading


def read_export(path: str | os.PathLike) -> Export:
    """Read and validate an export; ExportError naming the file and the problem (missing, truncated or
    corrupted, another format, a newer format version, a missing tensor, inconsistent shapes)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no integer export at {path} (write one with: python -m dq.export run=<run dir>)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ExportError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    try:
        metadata = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} has a malformed header: {err}") from err
    if metadata.get("format") != FORMAT_NAME:
        raise ExportError(f"{path} is not a dq integer export (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{path} has export format version {version!r}; this dq reads version {FORMAT_VERSION} "
                          "(a newer dq wrote it: upgrade dq, or export the run again with this one)")
    for key in ("unet_class", "unet_config", "timesteps", "quant_config", "layers", "attention", "attention_heads"):
        if key not in metadata:
            raise ExportError(f"{path} has no {key!r} in its header")
    export = Export(path, metadata, tensors)
    _validate(export)
    return export


def _require(export: Export, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if key not in export.tensors:
        raise ExportError(f"{export.path} is missing the tensor {key!r}")
    tensor = export.tensors[key]
    if shape is not None and tuple(tensor.shape) != shape:
        raise ExportError(f"{export.path}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _validate(export: Export) -> None:
    try:
        config = export.quant_config
    except (TypeError, ValueError) as err:
        raise ExportError(f"{export.path} has an invalid quant_config: {err}") from err
    steps = _require(export, "step_to_group", (config.num_steps,))
    if len(export.timesteps) != config.num_steps:
        raise ExportError(f"{export.path} holds {len(export.timesteps)} timesteps for TPQ tables of {config.num_steps} steps")
    groups = config.num_groups
    if int(steps.min()) < 0 or int(steps.max()) >= groups:
        raise ExportError(f"{export.path}: step_to_group points outside the {groups} TPQ groups")
    for name, info in export.metadata["layers"].items():
        shape = tuple(info["weight_shape"])
        numel = 1
        for dim in shape:
            numel *= dim
        codes = _require(export, f"{name}.weight_codes")
        if codes.ndim != 1 or codes.numel() != packed_numel(numel, info["weight_bits"]):
            raise ExportError(f"{export.path}: {name}.weight_codes holds {codes.numel()} values, expected "
                              f"{packed_numel(numel, info['weight_bits'])} for {shape} at {info['weight_bits']} bits")
        _require(export, f"{name}.weight_scale", (shape[0],))
        _require(export, f"{name}.weight_zero_point", (shape[0],))
        if config.weight_dilation:
            _require(export, f"{name}.wd_scale", (shape[1],))
        if sum(info["splits"]) != shape[1]:
            raise ExportError(f"{export.path}: {name} splits {info['splits']} do not add up to {shape[1]} input channels")
        for i in range(len(info["splits"])):
            _require(export, f"{name}.act.{i}.scale", (groups,))
            _require(export, f"{name}.act.{i}.zero_point", (groups,))
        if info.get("act_granularity", "tensor") not in ("tensor", "token") or (
                info.get("act_granularity") == "token" and (info["kind"] != "linear" or len(info["splits"]) != 1)):
            raise ExportError(f"{export.path}: {name} has activation granularity {info.get('act_granularity')!r}, "
                              f"which the runtime does not take for a {info['kind']}")
        if int(info.get("rotation_block", 1)) > 1:
            if info["kind"] != "linear" or shape[1] % int(info["rotation_block"]):
                raise ExportError(f"{export.path}: {name} has a rotation of blocks of {info['rotation_block']} that "
                                  f"its {info['kind']} {shape} cannot take")
            _require(export, f"{name}.rotation_signs", (shape[1],))
        rank = int(info.get("lowrank_rank", 0))
        if rank:
            if info["kind"] != "linear" or len(info["splits"]) != 1:
                raise ExportError(f"{export.path}: {name} has a low-rank branch, which the runtime takes on a Linear only")
            _require(export, f"{name}.lowrank_down", (rank, shape[1]))
            _require(export, f"{name}.lowrank_up", (shape[0], rank))
    for name in export.metadata["attention"]:
        for short in ATTN_QUANTIZERS:
            _require(export, f"{name}.{short}.scale", (groups,))
            _require(export, f"{name}.{short}.zero_point", (groups,))


def size_breakdown(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of an export file by what they hold (weight codes, weight qparams, TPQ tables, WD scales and input
    rotation signs, float parts, the step map, and the header with its metadata)."""
    path = Path(path)
    parts = {"weight codes": 0, "weight scales/zeros": 0, "TPQ tables": 0, "WD scales": 0, "float parts": 0,
             "low-rank branches": 0, "step map": 0}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            tensor = handle.get_tensor(key)
            size = tensor.numel() * tensor.element_size()
            if key.endswith((".lowrank_down", ".lowrank_up")):
                parts["low-rank branches"] += size
            elif key.startswith("float.") or key.endswith(".bias"):
                parts["float parts"] += size
            elif key.endswith(".weight_codes"):
                parts["weight codes"] += size
            elif key.endswith((".weight_scale", ".weight_zero_point")):
                parts["weight scales/zeros"] += size
            elif key.endswith((".wd_scale", ".rotation_signs")):
                parts["WD scales"] += size
            elif key == "step_to_group":
                parts["step map"] += size
            else:
                parts["TPQ tables"] += size
    parts["header + metadata"] = path.stat().st_size - sum(parts.values())
    return parts
