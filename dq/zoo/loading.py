"""Loading a diffusion model for dq: the embedded digits DDPM shipped in this package, or any diffusers
model folder on disk (offline; `save_pretrained` layout: `unet/` and `scheduler/`).

    unet, scheduler, sampler = load_model(cfg.model)      # the one entry point train.py calls

Weights load from safetensors only and configs from JSON, so loading never executes code from the folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import diffusers
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dq.sampling.config import SamplerConfig

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded"
MODEL_SOURCES = ("embedded", "local")
UNET_CLASSES: dict[str, type[nn.Module]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class LoadedModel(NamedTuple):
    unet: nn.Module  # in eval mode, float32, on the CPU
    scheduler: SchedulerMixin  # the training noise schedule; samplers are built from its config
    sampler: SamplerConfig  # the sampler settings of the model config


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(payload).__name__}")
    return payload


def load_model_folder(path: str | Path) -> tuple[nn.Module, SchedulerMixin]:
    """(unet, scheduler) from a diffusers model folder: `unet/config.json` + `unet/{UNET_WEIGHTS}` and
    `scheduler/scheduler_config.json`, as `save_pretrained` (or a downloaded pipeline) lays them out.

    ValueError naming the missing or malformed part when the folder does not have that layout.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"model folder {root} does not exist or is not a directory")
    layout_hint = "expected unet/ and scheduler/ as UNet2DModel.save_pretrained / SchedulerMixin.save_pretrained write them"
    missing = [
        str(part)
        for part in (Path("unet/config.json"), Path("unet") / UNET_WEIGHTS, Path("scheduler/scheduler_config.json"))
        if not (root / part).is_file()
    ]
    if missing:
        pickled = sorted(p.name for p in (root / "unet").glob("*.bin")) if (root / "unet").is_dir() else []
        note = f" (found {pickled}: pickle weights are not loaded, convert them to safetensors)" if pickled else ""
        raise ValueError(f"model folder {root} is missing {missing}{note}; {layout_hint}")

    unet_config = _read_json(root / "unet/config.json", "UNet config")
    unet_class_name = unet_config.get("_class_name")
    if unet_class_name not in UNET_CLASSES:
        raise ValueError(
            f"{root / 'unet/config.json'} has _class_name {unet_class_name!r}; expected one of {sorted(UNET_CLASSES)}"
        )
    scheduler_config = _read_json(root / "scheduler/scheduler_config.json", "scheduler config")
    scheduler_class_name = scheduler_config.get("_class_name")
    scheduler_class = getattr(diffusers, str(scheduler_class_name), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(
            f"{root / 'scheduler/scheduler_config.json'} has _class_name {scheduler_class_name!r}, "
            "which is not a diffusers scheduler class"
        )
    if "num_train_timesteps" not in scheduler_config:
        raise ValueError(f"{root / 'scheduler/scheduler_config.json'} has no num_train_timesteps")

    unet = UNET_CLASSES[unet_class_name].from_pretrained(
        root / "unet", use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False  # no `accelerate` needed
    )
    scheduler = scheduler_class.from_config(scheduler_config)
    return unet.eval(), scheduler


def model_folder(model_cfg: Mapping[str, Any]) -> Path:
    """The folder a model config points at: the package's embedded model, or `path` for source=local."""
    source = model_cfg.get("source")
    if source not in MODEL_SOURCES:
        raise ValueError(f"model.source must be one of {MODEL_SOURCES}, got {source!r}")
    path = _value(model_cfg, "path")
    if source == "embedded":
        if path is not None:
            raise ValueError(f"model.source=embedded loads the packaged model; use model=local for path {path!r}")
        return EMBEDDED_MODEL_DIR
    if path is None or str(path) == "":
        raise ValueError(
            "model=local needs model.path=/dir, a folder holding unet/ and scheduler/ as save_pretrained writes them"
        )
    return Path(str(path))


def load_model(model_cfg: Mapping[str, Any]) -> LoadedModel:
    """(unet, scheduler, sampler) for a model config (conf/model/*.yaml: source, path, sampler)."""
    folder = model_folder(model_cfg)
    sampler_cfg = model_cfg.get("sampler")
    if sampler_cfg is None:
        raise ValueError("the model config has no `sampler` settings (name, num_steps, eta, spacing, guidance_scale)")
    sampler = SamplerConfig.from_mapping(sampler_cfg)
    unet, scheduler = load_model_folder(folder)
    return LoadedModel(unet, scheduler, sampler)


def _value(model_cfg: Mapping[str, Any], key: str) -> Any:
    """model_cfg[key], with OmegaConf's mandatory marker '???' read as None instead of raising."""
    if isinstance(model_cfg, DictConfig) and OmegaConf.is_missing(model_cfg, key):
        return None
    return model_cfg.get(key)
