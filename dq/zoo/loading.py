"""Loading a diffusion model for dq: the embedded digits DDPM shipped in this package, any diffusers
model folder on disk (offline; `save_pretrained` layout: `unet/` and `scheduler/`, or a flat UNet repo with
`config.json` and `scheduler_config.json` at its root), or a hub checkpoint already in the local HF cache.

    unet, scheduler = load_model_folder(model_folder(cfg.model))   # the folder-level parts; dq.zoo.load_model
                                                                    # (dq/zoo/bundle.py) loads everything at once

Weights load from safetensors only and configs from JSON, so loading never executes code from the folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dq.arch import DENOISER_CLASSES, set_attention_heads
from dq.errors import MissingFileError, UserError
from dq.io import read_json_object
from dq.sampling.config import SamplerConfig

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded"
# the packaged models by model.embedded: the digits UNet (the default) and the class-conditional digits DiT
EMBEDDED_MODELS = {"unet": EMBEDDED_MODEL_DIR, "dit": Path(__file__).resolve().parent / "embedded_dit"}
MODEL_SOURCES = ("embedded", "local", "hub")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
ATTENTION_HEADS_FILE = "attention_heads.json"  # per-layer head counts UNet2DModel's config cannot express


def denoiser_dir(root: Path) -> Path:
    """The denoiser's folder in a model folder: `unet/`, `transformer/` (DiT, PixArt pipelines), or the
    root itself for a flat repo (config.json + scheduler_config.json at the root, as google/ddpm-*)."""
    for name in ("unet", "transformer"):
        if (root / name).is_dir():
            return Path(name)
    if (root / "config.json").is_file() and (root / "scheduler_config.json").is_file():
        return Path(".")
    return Path("unet")


def load_model_folder(path: str | Path) -> tuple[nn.Module, SchedulerMixin]:
    """(denoiser, scheduler) from a diffusers model folder: `unet/` (or `transformer/`) with config.json and
    {UNET_WEIGHTS}, and `scheduler/scheduler_config.json`, as `save_pretrained` (or a downloaded
    pipeline) lays them out.

    ValueError naming the missing or malformed part when the folder does not have that layout.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist or is not a directory")
    layout_hint = ("expected unet/ (or transformer/) and scheduler/ as the model's save_pretrained and "
                   "SchedulerMixin.save_pretrained write them")
    unet_dir = denoiser_dir(root)
    scheduler_dir = Path(".") if unet_dir == Path(".") else Path("scheduler")
    missing = [
        str(part)
        for part in (unet_dir / "config.json", unet_dir / UNET_WEIGHTS, scheduler_dir / "scheduler_config.json")
        if not (root / part).is_file()
    ]
    if missing:
        pickled = sorted(p.name for p in (root / unet_dir).glob("*.bin")) if (root / unet_dir).is_dir() else []
        note = f" (found {pickled}: pickle weights are not loaded, convert them to safetensors)" if pickled else ""
        raise UserError(f"model folder {root} is missing {missing}{note}; {layout_hint}")

    unet_config = read_json_object(root / unet_dir / "config.json", "denoiser config")
    unet_class_name = unet_config.get("_class_name")
    if unet_class_name not in DENOISER_CLASSES:
        raise UserError(
            f"{root / unet_dir / 'config.json'} has _class_name {unet_class_name!r}; expected one of {sorted(DENOISER_CLASSES)}"
        )
    scheduler_file = root / scheduler_dir / "scheduler_config.json"
    scheduler_config = read_json_object(scheduler_file, "scheduler config")
    scheduler_class_name = scheduler_config.get("_class_name")
    scheduler_class = getattr(diffusers, str(scheduler_class_name), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise UserError(
            f"{scheduler_file} has _class_name {scheduler_class_name!r}, "
            "which is not a diffusers scheduler class"
        )
    if "num_train_timesteps" not in scheduler_config:
        raise UserError(f"{scheduler_file} has no num_train_timesteps")

    unet = DENOISER_CLASSES[unet_class_name].from_pretrained(
        root / unet_dir, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False  # no `accelerate` needed
    )
    heads_file = root / unet_dir / ATTENTION_HEADS_FILE
    if heads_file.is_file():
        heads = read_json_object(heads_file, "attention-heads file").get("attention_heads")
        if not isinstance(heads, dict):
            raise UserError(f"{heads_file} must hold {{\"attention_heads\": {{module name: heads}}}}")
        set_attention_heads(unet, heads)
    scheduler = scheduler_class.from_config(scheduler_config)
    return unet.eval(), scheduler


def model_folder(model_cfg: Mapping[str, Any]) -> Path:
    """The folder a model config points at: the package's embedded model (model.embedded: unet, the default,
    or dit), `path` for source=local, or the
    local HF-cache snapshot of `repo_id` (at `revision`) for source=hub."""
    source = model_cfg.get("source")
    if source not in MODEL_SOURCES:
        raise UserError(f"model.source must be one of {MODEL_SOURCES}, got {source!r}")
    path = _value(model_cfg, "path")
    if source == "hub":
        if path is not None:
            raise UserError(f"model.source=hub loads model.repo_id from the HF cache; use model=local for path {path!r}")
        return hub_snapshot(_value(model_cfg, "repo_id"), _value(model_cfg, "revision"))
    if source == "embedded":
        if path is not None:
            raise UserError(f"model.source=embedded loads the packaged model; use model=local for path {path!r}")
        name = model_cfg.get("embedded") or "unet"
        if name not in EMBEDDED_MODELS:
            raise UserError(f"model.embedded must be one of {sorted(EMBEDDED_MODELS)}, got {name!r}")
        return EMBEDDED_MODELS[name]
    if path is None or str(path) == "":
        raise UserError(
            "model=local needs model.path=/dir, a folder holding unet/ and scheduler/ as save_pretrained writes them"
        )
    return Path(str(path))


def hub_snapshot(repo_id: str | None, revision: str | None = None) -> Path:
    """The folder of `repo_id` in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE); never downloads,
    so a run is reproducible offline and never waits on the network. FileNotFoundError saying how to get the
    checkpoint when it is not cached."""
    # imported here: only hub model configs need huggingface_hub's cache layout
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not repo_id:
        raise UserError("model.source=hub needs model.repo_id, e.g. google/ddpm-cifar10-32")
    try:
        return Path(snapshot_download(str(repo_id), revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as err:
        at = f" at revision {revision}" if revision else ""
        raise MissingFileError(
            f"checkpoint {repo_id}{at} is not in the local HF cache (dq never downloads at run time). Get it on a "
            f"machine with internet: `hf download {repo_id}` and copy the cache (HF_HOME) here, or save the model "
            "folder (unet/, scheduler/, ...) anywhere and use model=local model.path=DIR"
        ) from err


def model_sampler(model_cfg: Mapping[str, Any]) -> SamplerConfig:
    """The sampler settings of a model config (`model.sampler`)."""
    sampler_cfg = model_cfg.get("sampler")
    if sampler_cfg is None:
        raise UserError("the model config has no `sampler` settings (name, num_steps, eta, spacing, guidance_scale)")
    return SamplerConfig.from_mapping(sampler_cfg)


def _value(model_cfg: Mapping[str, Any], key: str) -> Any:
    """model_cfg[key], with OmegaConf's mandatory marker '???' read as None instead of raising."""
    if isinstance(model_cfg, DictConfig) and OmegaConf.is_missing(model_cfg, key):
        return None
    return model_cfg.get(key)
