"""One folder per trained student, loadable in one call by a diffusers user (offline; no Lightning, Hydra or
W&B are imported).

    dq.save_student(student, "student/", scheduler_config=scheduler.config)   # train.py writes <run>/student/
    unet = dq.load_student("student/", tpq_policy="nearest")                  # a diffusers UNet, quantized
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained("student/", subfolder="scheduler"))

The folder, in diffusers' layout for a UNet:

    config.json                        the UNet config (as `UNet2DModel.save_config` writes it)
    dq_student.json                    what dq adds: format and version, UNet class, attention head counts,
                                       the trained timesteps (dq's grid, and `pipeline_timesteps`: the same
                                       steps as the family's stock pipeline passes them, Flux's σ, SD3's
                                       unrounded σ·1000), the sampler, the QuantConfig, the files
    student.safetensors                the quantization state with the (dilated) float weights
                                       (`dq.quant.save_quant_state`: TPQ tables, WD's s, Δw/z_w)
    scheduler/scheduler_config.json    the model's training noise schedule (when given)
    student_int.safetensors            optional: the packed integer export (`python -m dq.export`)

`load_student` gives the fake-quant student (float32 arithmetic on quantized values) or, with
integer=True, the integer model of the export; both are keyed by timestep (`dq.quant.timesteps`), so a
pipeline that passes only `t` finds the TPQ row, and `tpq_policy` says what happens off the trained schedule.
Folders are written to a temporary sibling and renamed into place: a folder either is complete or absent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dq.arch import DENOISER_CLASSES, attention_heads, build_denoiser, describe
from dq.errors import MissingFileError, OutputExistsError, UserError
from dq.io import atomic_write, link_or_copy, place_file, staged_dir
from dq.quant import QuantConfig, load_quant_state, quant_config, save_quant_state
from dq.quant.timesteps import check_policy, key_by_timestep, timestep_keying, timestep_values

FORMAT_NAME = "dq-student"
FORMAT_VERSION = 1
MANIFEST = "dq_student.json"
STATE_FILE = "student.safetensors"
EXPORT_FILE = "student_int.safetensors"


class StudentFolderError(UserError):
    """A folder that is not a complete dq student folder (missing, unreadable or inconsistent parts)."""


def save_student(student: nn.Module, directory: str | os.PathLike, *,
                 timesteps: Sequence[int | float] | None = None,
                 scheduler_config: Mapping[str, Any] | None = None,
                 sampler: Mapping[str, Any] | None = None,
                 export: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
    """Write `student` (a dq student of a diffusers UNet) as a folder loadable by `load_student`.

    timesteps: the trained schedule (step i's timestep, call order); default: the student's own timestep
    keying (`dq.quant.key_by_timestep`), which a student without one must be given. scheduler_config: the
    training noise schedule, written as scheduler/ for pipelines. sampler: dq's sampler settings (a record).
    export: an integer export file to include (hard-linked when the filesystem allows, else copied).
    Returns the folder; FileExistsError when it exists and not overwrite.
    """
    directory = Path(directory)
    config = quant_config(student)
    if not hasattr(student, "config") or type(student).__name__ not in DENOISER_CLASSES:
        raise UserError(f"save_student takes a student of {sorted(DENOISER_CLASSES)}, got {type(student).__name__}")
    keying = timestep_keying(student)
    if timesteps is None:
        if keying is None:
            raise UserError("the student is not keyed by timestep: pass timesteps= (its trained schedule)")
        timesteps = keying.timestep_list()
    timesteps = timestep_values(timesteps)
    if len(timesteps) != config.num_steps:
        raise UserError(f"{len(timesteps)} timesteps given for TPQ tables of {config.num_steps} sampling steps")
    if directory.exists() and not overwrite:
        raise OutputExistsError(f"{directory} exists; pass overwrite=True to replace it")
    if export is not None and not Path(export).is_file():
        raise MissingFileError(f"export file {export} does not exist")

    calls = _pipeline_timesteps(student, timesteps, keying, scheduler_config, sampler)

    with staged_dir(directory) as staging:
        save_quant_state(student, staging / STATE_FILE, include_weights=True, timesteps=timesteps)
        student.save_config(staging)
        if scheduler_config is not None:
            (staging / "scheduler").mkdir()
            text = json.dumps(dict(scheduler_config), indent=2, default=_jsonable)
            (staging / "scheduler" / "scheduler_config.json").write_text(text + "\n")
        files = [STATE_FILE]
        if export is not None:
            link_or_copy(Path(export), staging / EXPORT_FILE)
            files.append(EXPORT_FILE)
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
            "unet_class": type(student).__name__,
            "attention_heads": attention_heads(student),
            "timesteps": timesteps,
            "pipeline_timesteps": calls,
            "sampler": dict(sampler) if sampler is not None else None,
            "quant_config": config.to_dict(),
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")
    return directory


def _pipeline_timesteps(student: nn.Module, timesteps: list[int | float], keying: Any,
                        scheduler_config: Mapping[str, Any] | None, sampler: Mapping[str, Any] | None
                        ) -> list[int | float]:
    """The trained schedule in the units the family's stock pipeline calls the denoiser with: from the
    sampler record (`dq.sampling.pipeline_timesteps`: Flux's unrounded σ, SD3's unrounded σ·1000) when it
    plans these timesteps, else the keying's own call timesteps when they were given, else the timesteps
    scaled to the denoiser's input units."""
    from dq.arch.flow_transformers import timestep_input_scale
    from dq.sampling import SamplerConfig, pipeline_timesteps, planned_timesteps

    if sampler is not None and scheduler_config is not None:
        settings = SamplerConfig.from_mapping(sampler)
        if planned_timesteps(scheduler_config, settings).tolist() == timesteps:
            return timestep_values(pipeline_timesteps(student, scheduler_config, settings))
    if keying is not None and keying.timestep_list() == timesteps and keying.call_timestep_list() != timesteps:
        return keying.call_timestep_list()
    return timestep_values(torch.tensor(timesteps, dtype=torch.float64) * timestep_input_scale(student))


def add_export(directory: str | os.PathLike, export: str | os.PathLike) -> Path:
    """Put an integer export into an existing student folder (hard link or copy), and record it."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    target = place_file(Path(export), directory / EXPORT_FILE)
    manifest["files"] = sorted(set(manifest["files"]) | {EXPORT_FILE})
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(directory / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return target


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """dq_student.json of a student folder; StudentFolderError naming what is wrong."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise StudentFolderError(f"student folder {directory} does not exist or is not a directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise StudentFolderError(f"{directory} is not a dq student folder: {MANIFEST} is missing "
                                 "(write one with dq.save_student, or use a train.py run's student/ folder)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudentFolderError(f"{path} is not valid JSON (corrupted?): {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StudentFolderError(f"{path} is not a dq student manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StudentFolderError(f"{path} has format version {manifest.get('format_version')}; this dq reads {FORMAT_VERSION}")
    for key in ("unet_class", "attention_heads", "timesteps", "quant_config", "files"):
        if key not in manifest:
            raise StudentFolderError(f"{path} lacks the key {key!r}")
    if manifest["unet_class"] not in DENOISER_CLASSES:
        raise StudentFolderError(f"{path}: denoiser class {manifest['unet_class']!r} is not one of {sorted(DENOISER_CLASSES)}")
    missing = [name for name in manifest["files"] if not (directory / name).is_file()]
    if missing or not (directory / "config.json").is_file():
        raise StudentFolderError(f"{directory} is incomplete: {missing or ['config.json']} missing")
    return manifest


def load_student(directory: str | os.PathLike, *, tpq_policy: str = "exact", integer: bool = False,
                 device: str | torch.device = "cpu", backend: str = "auto", compile: str = "none") -> nn.Module:
    """The student of a folder written by `save_student` (or a train.py run's `student/`), in eval mode.

    tpq_policy: what a timestep off the trained schedule does: "exact" (ValueError), "nearest",
    "interpolate" (`dq.quant.timesteps`). integer: the integer model of the folder's export
    (`dq.export.load_int_model`, backend "auto" | "onednn" | "gemm" | "triton" | "fp8") instead of the
    fake-quant student. compile: "none", or "fp32" / "bf16" for the integer model under torch.compile with that
    dtype between its layers (`dq.export.compile_int_model`: oneDNN on a CPU; it compiles on its first call).
    StudentFolderError (a ValueError) for a folder that is missing, incomplete or inconsistent.
    """
    check_policy(tpq_policy)
    if compile != "none" and not integer:
        raise UserError(f"compile={compile!r} compiles the integer model: load it with integer=True")
    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    if integer:
        if EXPORT_FILE not in manifest["files"]:
            raise StudentFolderError(f"{directory} holds no integer export ({EXPORT_FILE}); make one with "
                                     "python -m dq.export run=<run dir>, or load with integer=False")
        from dq.export import load_int_model

        model = load_int_model(directory / EXPORT_FILE, device=device, backend=backend, tpq_policy=tpq_policy)
        model = _key_by_manifest(model, manifest, tpq_policy, directory)
        if compile == "none":
            return model
        from dq.export import compile_int_model
        from dq.export.compiled import GLUE

        if compile not in GLUE:
            raise UserError(f"compile must be 'none' or one of {sorted(GLUE)}, got {compile!r}")
        return compile_int_model(model, compile)
    try:
        unet_config = json.loads((directory / "config.json").read_text())
        unet = build_denoiser(manifest["unet_class"], unet_config, manifest["attention_heads"])
    except (json.JSONDecodeError, ValueError) as err:
        raise StudentFolderError(f"{directory / 'config.json'}: {err}") from err
    try:
        student = load_quant_state(unet, directory / STATE_FILE, describe(unet), inplace=True,
                                   tpq_policy=tpq_policy)
    except (ValueError, FileNotFoundError) as err:
        raise StudentFolderError(f"{directory}: {err}") from err
    expected = QuantConfig.from_dict(manifest["quant_config"])
    if expected.diff(quant_config(student)):
        raise StudentFolderError(f"{directory}: {STATE_FILE} was saved with another QuantConfig than {MANIFEST} records")
    student = _key_by_manifest(student, manifest, tpq_policy, directory)
    return student.to(device).eval().requires_grad_(False)


def _key_by_manifest(model: nn.Module, manifest: Mapping[str, Any], policy: str, directory: Path) -> nn.Module:
    """Key `model` by the folder's trained schedule, its calls in the pipeline's units (`pipeline_timesteps`;
    a folder written before dq recorded them: the timesteps in the denoiser's input units)."""
    from dq.arch.flow_transformers import timestep_input_scale

    calls = manifest.get("pipeline_timesteps")
    if calls is None:
        calls = [t * timestep_input_scale(model) for t in manifest["timesteps"]]
    try:
        key_by_timestep(model, manifest["timesteps"], policy, call_timesteps=calls)
    except (TypeError, ValueError) as err:
        raise StudentFolderError(f"{directory / MANIFEST}: its timesteps do not key this student: {err}") from err
    return model


def _jsonable(value: Any) -> Any:
    """JSON for the values diffusers configs hold besides JSON types: tensors / arrays, tuples, sets."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
