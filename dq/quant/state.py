"""Save and load a student's complete quantization state as one safetensors file.

The file holds every TPQ table (Δ_x, z_x, step→group map), every WD factor s, every weight quantizer's
(Δ_w, z_w), optionally the (dilated) weights themselves, and in its metadata the QuantConfig, a format
version and, for a student keyed by timestep (`dq.quant.key_by_timestep`), its trained schedule. Loading
checks all of them and refuses, naming the mismatch, anything that does not fit.
Writes go to a temporary file renamed into place; loading never executes code from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dq.errors import MissingFileError, UserError
from dq.io import atomic_write
from dq.quant.config import QuantConfig
from dq.quant.convert import (
    CONFIG_ATTR,
    ModelLayout,
    drop_lowrank_absent,
    is_quantized,
    quant_config,
    quantize_model,
)
from dq.quant.quantizers import TemporalActQuantizer, WeightQuantizer
from dq.quant.timesteps import check_policy, key_by_timestep, timestep_keying, timestep_values

FORMAT_NAME = "dq-quant-state"
FORMAT_VERSION = 1
_QUANT_SUFFIXES = (".wd_scale", ".rotation_signs", ".lowrank_down", ".lowrank_up", ".lowrank_scale")


def _is_quant_entry(name: str, model: nn.Module) -> bool:
    owner_name, _, _ = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return isinstance(owner, (TemporalActQuantizer, WeightQuantizer)) or name.endswith(_QUANT_SUFFIXES)


def quant_state_dict(model: nn.Module, include_weights: bool = False) -> dict[str, torch.Tensor]:
    """The student's quantization tensors (and, with include_weights, its whole state_dict)."""
    quant_config(model)
    state = model.state_dict()
    if include_weights:
        return dict(state)
    return {k: v for k, v in state.items() if _is_quant_entry(k, model)}


def save_quant_state(model: nn.Module, path: str | os.PathLike, include_weights: bool = True,
                     timesteps: list[int | float] | None = None) -> Path:
    """Write the student's quantization state (and weights, by default) to `path` (.safetensors), with its
    trained schedule: `timesteps` (step i's timestep) or, by default, the student's timestep keying's."""
    config = quant_config(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in quant_state_dict(model, include_weights).items()}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "quant_config": json.dumps(config.to_dict(), sort_keys=True),
        "includes_weights": json.dumps(include_weights),
    }
    keying = timestep_keying(model)
    if timesteps is None and keying is not None:
        timesteps = keying.timestep_list()
    if timesteps is not None:
        if len(timesteps) != config.num_steps:
            raise UserError(f"{len(timesteps)} timesteps given for TPQ tables of {config.num_steps} sampling steps")
        metadata["timesteps"] = json.dumps(timestep_values(timesteps))
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def read_quant_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], QuantConfig, bool]:
    """(tensors, config, includes_weights) of a saved state; ValueError for a file that is not one."""
    tensors, config, includes_weights, _ = read_quant_state_full(path)
    return tensors, config, includes_weights


def read_quant_state_full(path: str | os.PathLike
                          ) -> tuple[dict[str, torch.Tensor], QuantConfig, bool, list[int | float] | None]:
    """(tensors, config, includes_weights, trained timesteps or None) of a saved state."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no quantization state file at {path}")
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file (corrupted or truncated?): {err}") from err
    if metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a dq quantization state (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise UserError(
            f"{path} has quant-state format version {version}, this dq reads version {FORMAT_VERSION}"
        )
    try:
        config = QuantConfig.from_dict(json.loads(metadata["quant_config"]))
        includes_weights = bool(json.loads(metadata["includes_weights"]))
        timesteps = json.loads(metadata["timesteps"]) if "timesteps" in metadata else None
    except (KeyError, json.JSONDecodeError) as err:
        raise UserError(f"{path} has a malformed quant-state header: {err}") from err
    if timesteps is not None and (not isinstance(timesteps, list) or len(timesteps) != config.num_steps
                                  or not all(isinstance(t, (int, float)) for t in timesteps)):
        raise UserError(f"{path} records trained timesteps {timesteps!r} that do not fit its {config.num_steps} TPQ steps")
    return tensors, config, includes_weights, timesteps


def load_quant_state(model: nn.Module, path: str | os.PathLike, arch: ModelLayout | None = None,
                     inplace: bool = False, tpq_policy: str = "exact") -> nn.Module:
    """Load a saved state into `model` and return the student.

    A float model is first converted with the saved QuantConfig and its architecture description `arch`
    (`dq.arch.describe(model)`; a copy unless inplace); a student must have been built with the same config.
    Every key and shape must match; mismatches raise ValueError.
    A file that records its trained schedule keys the student by timestep with `tpq_policy` ("exact",
    "nearest" or "interpolate": `dq.quant.timesteps`).
    """
    check_policy(tpq_policy)
    tensors, config, includes_weights, timesteps = read_quant_state_full(path)
    if is_quantized(model):
        differences = config.diff(quant_config(model))
        if differences:
            raise UserError(f"{path} was saved with another QuantConfig; differing fields (file, model): {differences}")
        student = model
    elif arch is None:
        raise UserError(f"{type(model).__name__} is a float model: converting it to load {path} needs its "
                        "architecture description, load_quant_state(model, path, arch=dq.arch.describe(model))")
    else:
        student = quantize_model(model, config, arch, inplace=inplace)
    if config.lowrank_mode == "decay":  # decayed branches were dropped after training: the file has none
        drop_lowrank_absent(student, tensors)
    expected = quant_state_dict(student, include_weights=includes_weights)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit this model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    bad_shapes = {k: (tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items() if tensors[k].shape != v.shape}
    if bad_shapes:
        raise UserError(f"{path} does not fit this model; shape mismatches (file, model): {dict(list(bad_shapes.items())[:5])}")
    student.load_state_dict(tensors, strict=includes_weights)
    setattr(student, CONFIG_ATTR, config)
    if timesteps is not None:
        key_by_timestep(student, timesteps, tpq_policy)
    return student
