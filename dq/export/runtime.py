"""Build the integer inference model from an export: the diffusers UNet of its config, every quantized
Conv2d/Linear replaced by an integer layer, attention with its per-step q/k/v/softmax tables, and the float
parts loaded. Imports torch, safetensors and diffusers only (no Lightning, Hydra or W&B)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from dq.arch import build_denoiser
from dq.export.artifact import (
    Export,
    ExportError,
    IntLayerSpec,
    act_table,
    input_quantizers,
    layer_export,
    read_export,
)
from dq.export.backends import backend_chain, resolve_backend
from dq.export.layers import IntActQuantizer, IntConv2d, IntLinear, IntTokenActQuantizer
from dq.quant.attention import QuantAttnProcessor, QuantJointAttnProcessor
from dq.quant.convert import CONFIG_ATTR
from dq.quant.layers import QuantConv2d, QuantLinear
from dq.quant.timesteps import check_policy, key_by_timestep

log = logging.getLogger(__name__)

EXPORT_ATTR = "dq_export"  # the export's metadata, on the model it built
PROCESSORS = {cls.__name__: cls for cls in (QuantAttnProcessor, QuantJointAttnProcessor)}  # by the export's record


def load_int_model(path: str | os.PathLike, device: str | torch.device = "cpu", backend: str = "auto",
                   tpq_policy: str = "exact") -> nn.Module:
    """The integer model of the export at `path`, in eval mode on `device`, keyed by the export's trained
    timesteps with `tpq_policy` (exact | nearest | interpolate: `dq.quant.timesteps`).

    backend: "auto" (oneDNN on a CPU, torch._int_mm GEMMs on CUDA), or one of `dq.export.backends` (onednn, gemm,
    triton, fp8); layers a named backend does not take run the next one that does.
    ExportError (a ValueError) for a file that is not a valid export or does not fit its own UNet config.
    """
    return int_model_from_export(read_export(path), device, backend, tpq_policy)


def int_model_from_export(export: Export, device: str | torch.device = "cpu", backend: str = "auto",
                          tpq_policy: str = "exact") -> nn.Module:
    check_policy(tpq_policy)
    device = torch.device(device)
    backend = resolve_backend(backend, device)
    chain = backend_chain(backend, device)
    meta = export.metadata
    try:
        unet = build_denoiser(meta["unet_class"], meta["unet_config"], meta["attention_heads"])
    except ValueError as err:
        raise ExportError(f"{export.path}: {err}") from err
    step_to_group = export.tensors["step_to_group"].long()
    int_keys: set[str] = set()
    for spec in export.layer_specs():
        layer = int_layer(spec, _submodule(export, unet, spec.name), step_to_group, chain, export.path)
        parent_name, _, short = spec.name.rpartition(".")
        setattr(unet.get_submodule(parent_name) if parent_name else unet, short, layer)
        int_keys.update(f"{spec.name}.{k}" for k in layer.state_dict())
    for proc_name, info in meta["attention"].items():
        attn_name = proc_name.removesuffix(".processor")
        attn = _submodule(export, unet, attn_name)
        tables = export.attention_tables(proc_name)
        bits = {"q": info["qkv_bits"], "k": info["qkv_bits"], "v": info["qkv_bits"], "probs": info["softmax_bits"]}
        quantizers = {q: IntActQuantizer(bits[q], *tables[q], step_to_group) for q in tables}
        processor_class = PROCESSORS.get(info.get("processor", "QuantAttnProcessor"))  # files before SD3/Flux: none
        if processor_class is None:
            raise ExportError(f"{export.path}: {proc_name} has an attention processor dq does not know: "
                              f"{info.get('processor')!r}")
        processor = processor_class.from_quantizers(**quantizers)
        attn.set_processor(processor)
        int_keys.update(f"{proc_name}.{k}" for k in processor.state_dict())
    floats = export.float_state()
    expected = {k: v for k, v in unet.state_dict().items() if k not in int_keys}
    missing, unexpected = sorted(set(expected) - set(floats)), sorted(set(floats) - set(expected))
    if missing or unexpected:
        raise ExportError(f"{export.path} does not fit its UNet config: {len(missing)} float tensor(s) missing "
                          f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")
    shapes = [k for k, v in expected.items() if tuple(v.shape) != tuple(floats[k].shape)]
    if shapes:
        raise ExportError(f"{export.path}: float tensors of the wrong shape for its UNet config: {shapes[:4]}")
    unet.load_state_dict(floats, strict=False)
    setattr(unet, CONFIG_ATTR, export.quant_config)
    setattr(unet, EXPORT_ATTR, dict(meta, path=str(export.path), backend=backend))
    unet = unet.to(device).eval().requires_grad_(False)
    two_planes = sum(any(len(k.factors) > 1 for k in m.kernels) for m in unet.modules() if isinstance(m, (IntConv2d, IntLinear)))
    if two_planes:
        log.warning("%s: this CPU's int8 kernels add product pairs in a saturating int16 (no VNNI); %d integer "
                    "layer(s) run their 8-bit weights as two planes to stay exact (about twice their time; 4-bit weights "
                    "or 7-bit activations need one: docs/benchmarks.md)",
                    export.path, two_planes)
    key_by_timestep(unet, export.timesteps, tpq_policy)
    return unet


def _submodule(export: Export, unet: nn.Module, name: str) -> nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError as err:
        raise ExportError(f"{export.path} names a layer {name!r} that its UNet config does not have") from err


def int_layer(spec: IntLayerSpec, module: nn.Module, step_to_group: torch.Tensor, backend: str | tuple[str, ...],
              source: object = "the export") -> IntConv2d | IntLinear:
    """The integer layer of `spec`, with the geometry (stride, padding, dilation) of `module`, the float
    Conv2d / Linear (or quantized twin) it replaces."""
    expected_type = nn.Conv2d if spec.kind == "conv2d" else nn.Linear
    if not isinstance(module, expected_type) or tuple(module.weight.shape) != spec.weight_shape:
        raise ExportError(f"{source}: {spec.name} is a {spec.kind} {spec.weight_shape} in the export but a "
                          f"{type(module).__name__} {tuple(module.weight.shape)} in its UNet config")
    if (module.bias is None) != (spec.bias is None):
        raise ExportError(f"{source}: {spec.name} bias presence differs from its UNet config")
    if spec.act_granularity == "token":
        quantizers = [IntTokenActQuantizer(spec.act_bits, spec.act_tables[0][0], step_to_group)]
    else:
        quantizers = [IntActQuantizer(spec.act_bits, scale, zp, step_to_group) for scale, zp in spec.act_tables]
    if spec.kind == "linear":
        return IntLinear(spec.weight_int, spec.weight_scale, spec.bias, spec.wd_scale, quantizers[0], spec.weight_bits,
                         backend, spec.rotation_signs, spec.rotation_block, spec.lowrank_down, spec.lowrank_up)
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ExportError(f"{source}: {spec.name} is not a plain zero-padded, ungrouped Conv2d")
    return IntConv2d(spec.weight_int, spec.weight_scale, spec.bias, spec.wd_scale, quantizers, spec.splits,
                     module.stride, module.padding, module.dilation, spec.weight_bits, backend)


def int_twin(layer: QuantConv2d | QuantLinear, backend: str = "auto", float_dtype: str = "float32"
             ) -> IntConv2d | IntLinear:
    """The integer layer that a calibrated QuantConv2d / QuantLinear exports to (through the export's own
    tensors), on the CPU; for tests and benchmarks of single layers."""
    tensors, info = layer_export("layer", layer, float_dtype, weight_dilation=True)
    parts = input_quantizers(layer)
    for i, part in enumerate(parts):
        tensors.update(act_table(f"layer.act.{i}", part))
    spec = Export(Path("<memory>"), {"layers": {"layer": info}}, tensors).layer_specs()[0]
    cpu = torch.device("cpu")
    return int_layer(spec, layer, parts[0].step_to_group, backend_chain(resolve_backend(backend, cpu), cpu))
