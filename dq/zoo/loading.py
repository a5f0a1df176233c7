"""Loading a diffusion model for dq: the embedded digits DDPM shipped in this package, any diffusers
model folder on disk (offline), or a hub checkpoint already in the local HF cache. A folder is read as
diffusers reads it: through its `model_index.json` when it has one (a pipeline download), else `unet/` (or
`transformer/`) beside `scheduler/`, or a flat UNet repo with `config.json` and `scheduler_config.json` at
its root. Weights are one safetensors file, or shards with their `*.safetensors.index.json`, or a
`fp16`/`bf16` variant of either (model.variant; read by itself when it is all the folder holds).

    unet, scheduler = load_model_folder(model_folder(cfg.model), variant=None, dtype=None)  # dq.zoo.load_model
                                                                    # (dq/zoo/bundle.py) loads everything at once

Weights load from safetensors only and configs from JSON, so loading never executes code from the folder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dq.arch import DENOISER_CLASSES, set_attention_heads
from dq.errors import MissingFileError, UnsupportedError, UserError
from dq.io import read_json_object
from dq.sampling.config import SamplerConfig

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "embedded"
# the packaged models by model.embedded: the digits UNet (the default), the class-conditional digits DiT, and a
# PixArt-shaped digits transformer (cross-attention to a caption a label), held apart from the DiT's choices
EMBEDDED_MODELS = {"unet": EMBEDDED_MODEL_DIR, "dit": Path(__file__).resolve().parent / "embedded_dit",
                   "pixart": Path(__file__).resolve().parent / "embedded_pixart"}
MODEL_SOURCES = ("embedded", "local", "hub")
MODEL_INDEX = "model_index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # the weights' file stem of diffusers models; transformers': "model"
UNET_WEIGHTS = f"{DIFFUSERS_WEIGHTS}.safetensors"
VARIANTS = ("fp16", "bf16")  # the weight variants the hub repos ship beside (or instead of) the full weights
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DENOISER_FOLDERS = ("unet", "transformer")
FLUX_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latents of 1024 px images)
ATTENTION_HEADS_FILE = "attention_heads.json"  # per-layer head counts UNet2DModel's config cannot express
log = logging.getLogger("dq.zoo")


@dataclass(frozen=True)
class FolderLayout:
    """Where the parts of a model folder are, read from its model_index.json when it has one."""

    root: Path
    denoiser: Path  # the denoiser's folder relative to root: unet/, transformer/ or . (a flat repo)
    scheduler: Path  # the scheduler's folder relative to root (scheduler/, or . for a flat repo)
    index: dict[str, Any] | None = None  # model_index.json, when the folder has one

    @property
    def pipeline_class(self) -> str | None:
        """The pipeline class model_index.json names (e.g. StableDiffusionPipeline), or None."""
        return None if self.index is None else self.index.get("_class_name")

    def has_component(self, name: str) -> bool:
        """Whether the folder holds component `name` (vae, text_encoder, ...): its folder exists and
        model_index.json, when there is one, does not list it as absent ([null, null])."""
        if not (self.root / name).is_dir():
            return False
        entry = None if self.index is None else self.index.get(name)
        return not (isinstance(entry, list) and entry and entry[0] is None)


def read_layout(path: str | Path) -> FolderLayout:
    """The layout of a model folder: with model_index.json (a pipeline as DiffusionPipeline.save_pretrained
    or a hub download writes it), the denoiser is the entry of `unet` or `transformer` that names a class
    dq quantizes; without, unet/ or transformer/ beside scheduler/, or a flat repo (config.json +
    scheduler_config.json at the root, as google/ddpm-*)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"model folder {root} does not exist or is not a directory")
    if (root / MODEL_INDEX).is_file():
        index = read_json_object(root / MODEL_INDEX, "pipeline index")
        named = {key: index[key] for key in DENOISER_FOLDERS if isinstance(index.get(key), list)}
        if not named:
            raise UnsupportedError(f"{root / MODEL_INDEX} ({index.get('_class_name')}) names no unet or transformer; "
                                   f"dq quantizes the denoisers {sorted(DENOISER_CLASSES)}")
        key, (_, class_name) = next(iter(named.items()))
        if class_name not in DENOISER_CLASSES:
            raise UnsupportedError(f"{root / MODEL_INDEX} names {key}: {class_name}, which dq does not quantize; "
                                   f"it knows {sorted(DENOISER_CLASSES)}")
        return FolderLayout(root, Path(key), Path("scheduler"), index)
    for name in DENOISER_FOLDERS:
        if (root / name).is_dir():
            return FolderLayout(root, Path(name), Path("scheduler"))
    if (root / "config.json").is_file() and (root / "scheduler_config.json").is_file():
        return FolderLayout(root, Path("."), Path("."))
    return FolderLayout(root, Path("unet"), Path("scheduler"))


def denoiser_dir(root: Path) -> Path:
    """The denoiser's folder in a model folder, relative to it (see `read_layout`)."""
    return read_layout(root).denoiser


def weights_variant(folder: Path, variant: str | None = None, stem: str = DIFFUSERS_WEIGHTS) -> str | None:
    """The variant to load the safetensors weights of component folder `folder` with: one file
    `{stem}.safetensors` or shards listed by `{stem}.safetensors.index.json`, or the same of a variant
    (`{stem}.fp16.safetensors`, `{stem}.safetensors.index.fp16.json` and its shards). variant=None reads the
    full weights, or the one variant the folder holds when it holds only that; a variant the folder lacks
    falls back to its full weights (as diffusers' pipelines do), with a log line. UserError naming the folder
    when it holds no safetensors weights, several variants and no choice, or an index whose shards are missing."""
    if variant is not None and variant not in VARIANTS:
        raise UserError(f"model.variant must be one of {VARIANTS} or null, got {variant!r}")
    found = _weight_variants(folder, stem)
    if variant is None or variant not in found:
        if None not in found:
            others = sorted(v for v in found if v is not None)
            if variant is None and len(others) == 1:
                log.info("dq: %s holds only %s weights: loading those", folder, others[0])
                variant = others[0]
            elif others:
                asked = "" if variant is None else f"no {variant} weights and "
                raise UserError(f"{folder} holds {asked}the variants {others} only; choose one with model.variant")
            else:
                pickled = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
                note = f" (found {pickled}: pickle weights are not loaded, convert them to safetensors)" if pickled else ""
                raise MissingFileError(f"{folder} has no {stem}.safetensors (nor sharded with "
                                       f"{stem}.safetensors.index.json, nor a {'/'.join(VARIANTS)} variant){note}")
        elif variant is not None:
            log.info("dq: %s has no %s weights: loading its full-precision %s", folder, variant, stem)
            variant = None
    index = found[variant]
    if index is not None:
        weight_map = read_json_object(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"weights index {index} has no weight_map")
        missing = sorted({str(f) for f in weight_map.values()} - {p.name for p in folder.iterdir()})
        if missing:
            raise MissingFileError(f"{index} lists shards that are not in {folder}: {missing[:4]}")
    return variant


def _weight_variants(folder: Path, stem: str) -> dict[str | None, Path | None]:
    """{variant (None: the full weights): its index file, or None for one weights file} in `folder`."""
    found: dict[str | None, Path | None] = {}
    for variant in (None, *VARIANTS):
        tag = "" if variant is None else f".{variant}"
        if (folder / f"{stem}{tag}.safetensors").is_file():
            found[variant] = None
        elif (folder / f"{stem}.safetensors.index{tag}.json").is_file():
            found[variant] = folder / f"{stem}.safetensors.index{tag}.json"
    return found


def torch_dtype(name: str | None) -> torch.dtype:
    """The dtype of model.dtype (null: float32, which dq trains in)."""
    if name is None:
        return torch.float32
    if str(name) not in DTYPES:
        raise UserError(f"model.dtype must be one of {sorted(DTYPES)} or null, got {name!r}")
    return DTYPES[str(name)]


def load_model_folder(path: str | Path, *, variant: str | None = None, dtype: str | None = None,
                      sample_size: int | None = None) -> tuple[nn.Module, SchedulerMixin]:
    """(denoiser, scheduler) from a diffusers model folder (`read_layout`): the denoiser's config.json and
    safetensors weights (one file, sharded with an index, or a fp16/bf16 variant: `weights_variant`), and
    the scheduler's scheduler_config.json. dtype: the denoiser's (model.dtype; null: float32). sample_size
    (model.sample_size): the latent size to sample at, recorded in the denoiser's config; a Flux transformer,
    whose config records none, gets FluxPipeline's default 128.

    UserError naming the missing or malformed part when the folder does not have that layout.
    """
    layout = read_layout(path)
    root, unet_dir, scheduler_dir = layout.root, layout.denoiser, layout.scheduler
    layout_hint = (f"expected {MODEL_INDEX} or unet/ (or transformer/) and scheduler/ as the pipeline's "
                   "save_pretrained writes them")
    missing = [str(part) for part in (unet_dir / "config.json", scheduler_dir / "scheduler_config.json")
               if not (root / part).is_file()]
    if missing:
        raise MissingFileError(f"model folder {root} is missing {missing}; {layout_hint}")
    variant = weights_variant(root / unet_dir, variant)

    unet_config = read_json_object(root / unet_dir / "config.json", "denoiser config")
    unet_class_name = unet_config.get("_class_name")
    if unet_class_name not in DENOISER_CLASSES:
        raise UserError(
            f"{root / unet_dir / 'config.json'} has _class_name {unet_class_name!r}; expected one of {sorted(DENOISER_CLASSES)}"
        )
    indexed = (layout.index or {}).get(str(unet_dir), [None, unet_class_name])[1]
    if indexed != unet_class_name:
        raise UserError(f"{root / MODEL_INDEX} names {unet_dir}: {indexed}, but {root / unet_dir / 'config.json'} "
                        f"is a {unet_class_name}")
    scheduler_file = root / scheduler_dir / "scheduler_config.json"
    scheduler_config = read_json_object(scheduler_file, "scheduler config")
    # a pipeline's index names the scheduler class it runs (diffusers loads that one); else the config's own
    scheduler_class_name = (layout.index or {}).get("scheduler", [None, scheduler_config.get("_class_name")])[1]
    scheduler_class = getattr(diffusers, str(scheduler_class_name), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise UserError(
            f"{scheduler_file} has _class_name {scheduler_class_name!r}, "
            "which is not a diffusers scheduler class"
        )
    if "num_train_timesteps" not in scheduler_config:
        raise UserError(f"{scheduler_file} has no num_train_timesteps")

    unet = DENOISER_CLASSES[unet_class_name].from_pretrained(
        root / unet_dir, use_safetensors=True, local_files_only=True, variant=variant, dtype=torch_dtype(dtype),
        low_cpu_mem_usage=False,  # no `accelerate` needed
    )
    heads_file = root / unet_dir / ATTENTION_HEADS_FILE
    if heads_file.is_file():
        heads = read_json_object(heads_file, "attention-heads file").get("attention_heads")
        if not isinstance(heads, dict):
            raise UserError(f"{heads_file} must hold {{\"attention_heads\": {{module name: heads}}}}")
        set_attention_heads(unet, heads)
    scheduler = scheduler_class.from_config(scheduler_config)
    if sample_size is not None:
        unet.register_to_config(sample_size=int(sample_size))
    elif unet_class_name == "FluxTransformer2DModel" and unet.config.get("sample_size") is None:
        # FluxPipeline's default_sample_size: 128 latents, 1024 px through its VAE's factor 8
        log.info("dq: %s records no sample size: 128 (FluxPipeline's default, 1024 px); set model.sample_size "
                 "to change it", root / unet_dir)
        unet.register_to_config(sample_size=FLUX_SAMPLE_SIZE)
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
        if path is not None and str(path) != "":  # a real model's config pointed at its download
            log.info("dq: model.path is set: loading %s instead of %s from the HF cache", path,
                     _value(model_cfg, "repo_id"))
            return Path(str(path)).expanduser()
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


def model_sampler(model_cfg: Mapping[str, Any], defaults: Mapping[str, Any] | None = None,
                  reason: str | None = None) -> SamplerConfig:
    """The sampler settings of a model config (`model.sampler`); a setting left null takes its value from
    `defaults` (the folder's own pipeline's: `dq.zoo.families.family_sampler`), said in one log line."""
    sampler_cfg = model_cfg.get("sampler")
    if sampler_cfg is None:
        raise UserError("the model config has no `sampler` settings (name, num_steps, eta, spacing, guidance_scale)")
    values = dict(sampler_cfg)
    filled = {k: v for k, v in (defaults or {}).items() if values.get(k) is None and v is not None}
    values.update(filled)
    values = {k: v for k, v in values.items() if v is not None or k in ("guidance_scale", "shift")}
    if filled:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in filled.items())
        log.info("dq: sampler from the folder (%s): %s; set model.sampler.<key> to change", reason, shown)
    return SamplerConfig.from_mapping(values)


def _value(model_cfg: Mapping[str, Any], key: str) -> Any:
    """model_cfg[key], with OmegaConf's mandatory marker '???' read as None instead of raising."""
    if isinstance(model_cfg, DictConfig) and OmegaConf.is_missing(model_cfg, key):
        return None
    return model_cfg.get(key)
