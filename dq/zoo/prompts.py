"""Text prompts encoded as the model's own pipeline encodes them, packed as dq's conditioning.

    cond, uncond, record = encode_with_pipeline("FluxPipeline", parts, denoiser, prompts, guidance=False)

The pipeline class a folder's model_index.json names is built around the folder's loaded parts (its text
encoders and tokenizers, VAE, scheduler and the FP denoiser) and its own `encode_prompt` runs: the same
tokenization, truncation, padding, clip skip, pooled projections and negative prompt that pipeline's
`__call__` uses, with that `__call__`'s defaults (max_sequence_length, clean_caption, Sana's
complex_human_instruction) unless model.conditioning sets them. What a family's denoiser takes besides the
token embeddings is packed as dq.arch.text_conditioning says:

  StableDiffusionPipeline              CLIP embeddings [P, 77, 768]; the empty prompt for guidance
  StableDiffusionXLPipeline            both CLIPs' embeddings + pooled + time ids (original = target size,
                                       crop (0, 0), at the denoiser's sample size); negative zeros as the
                                       folder's force_zeros_for_empty_prompt says
  StableDiffusion3Pipeline             CLIP x2 + T5 embeddings + pooled; the empty negative prompt
  FluxPipeline                         T5 embeddings + CLIP pooled (+ FLUX.1-dev's distilled guidance value)
  PixArtAlphaPipeline / PixArtSigma..  T5 embeddings + attention mask (+ resolution, aspect ratio at 1024 α)
  SanaPipeline                         Gemma 2 embeddings (after its instruction prefix) + attention mask

Prompts are encoded in batches; the unconditional row once, from the first batch. `cached_encoding` keeps
the result on disk under a key of everything that decides it (the pipeline class, the prompts, the settings,
and each text part's files by name, size and modification time), so train, evaluate and export encode a
prompt set once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from dq.arch.text_conditioning import pack_text_conditioning, text_fields
from dq.errors import UnsupportedError, UserError
from dq.io import atomic_write

log = logging.getLogger("dq.zoo")

ENCODED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                     "FluxPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "SanaPipeline")
BATCH = 16


def call_default(pipeline_class: str, name: str) -> Any:
    """The default of argument `name` of the pipeline's __call__ (None when it has no such argument)."""
    parameter = inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def build_pipeline(pipeline_class: str, parts: Mapping[str, Any], index: Mapping[str, Any] | None = None) -> Any:
    """The pipeline around `parts` (name -> module, e.g. text_encoder, transformer, scheduler); every other
    part it takes is None; the settings model_index.json records (force_zeros_for_empty_prompt) are passed;
    no safety checker or watermarker. The parts' configs are left as they were."""
    cls = getattr(diffusers, pipeline_class)
    settings = {"requires_safety_checker": False, "add_watermarker": False}
    kwargs = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if name in parts:
            kwargs[name] = parts[name]
        elif index is not None and name in index and not isinstance(index[name], list):
            kwargs[name] = index[name]
        elif name in settings:
            kwargs[name] = settings[name]
        elif parameter.default is inspect.Parameter.empty:
            kwargs[name] = None
    # a pipeline's __init__ may rewrite the configs of the parts it is given (StableDiffusionPipeline sets
    # the scheduler's steps_offset to 1): the parts stay as loaded
    configs = {name: part._internal_dict for name, part in kwargs.items() if hasattr(part, "_internal_dict")}
    pipe = cls(**kwargs)
    for name, config in configs.items():
        kwargs[name]._internal_dict = config
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_with_pipeline(pipeline_class: str, parts: Mapping[str, Any], denoiser: nn.Module, prompts: Sequence[str],
                         *, guidance: bool, max_sequence_length: int | None = None,
                         distilled_guidance: float | None = None, index: Mapping[str, Any] | None = None,
                         batch_size: int = BATCH, device: torch.device | str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(cond float32 [P, L(+1), D], uncond float32 [1, L(+1), D] or None without guidance, the record of the
    encoding) on the CPU for `prompts`, by `pipeline_class`'s own encode_prompt on `parts` (the folder's
    text encoders, tokenizers, VAE, scheduler) with `denoiser` (the FP one: some pipelines read its config).
    device: where the text encoders run (they are moved there; None: where they are)."""
    if pipeline_class not in ENCODED_PIPELINES:
        raise UnsupportedError(f"dq encodes prompts with the pipelines {list(ENCODED_PIPELINES)}; this folder's "
                               f"is {pipeline_class}: give model.conditioning.prompt_embeds_file")
    if not prompts:
        raise UserError("no prompts to encode")
    denoiser_key = "unet" if pipeline_class.startswith("StableDiffusion") and "3" not in pipeline_class else "transformer"
    if device is not None:
        for name, part in parts.items():
            if name.startswith("text_encoder") and isinstance(part, nn.Module):
                part.to(device)
    pipe = build_pipeline(pipeline_class, {**parts, denoiser_key: denoiser}, index)
    if max_sequence_length is None:
        max_sequence_length = call_default(pipeline_class, "max_sequence_length")
    guidance_embeds = any(name == "guidance" for name, _ in text_fields(denoiser))
    if guidance_embeds and distilled_guidance is None:
        distilled_guidance = call_default(pipeline_class, "guidance_scale")
    record = {"pipeline": pipeline_class, "max_sequence_length": max_sequence_length,
              "distilled_guidance": distilled_guidance if guidance_embeds else None}
    encode = _ENCODERS[pipeline_class]
    conds, uncond = [], None
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            first = start == 0
            cond, negative = encode(pipe, list(prompts[start : start + batch_size]), guidance and first,
                                    max_sequence_length, distilled_guidance)
            conds.append(cond.float().cpu())
            if first and guidance:
                uncond = negative[:1].float().cpu()
    return torch.cat(conds), uncond, record


Encoded = tuple[torch.Tensor, "torch.Tensor | None"]


def _device(pipe: Any) -> torch.device:
    """Where the text encoders are (the pipeline's own guess reads whichever part comes first)."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, nn.Module):
            return next(encoder.parameters()).device
    return torch.device("cpu")


def _sd(pipe: Any, prompts: list[str], cfg: bool, _msl: int | None, _g: float | None) -> Encoded:
    return pipe.encode_prompt(prompts, _device(pipe), 1, cfg, negative_prompt=None)


def _sdxl(pipe: Any, prompts: list[str], cfg: bool, _msl: int | None, _g: float | None) -> Encoded:
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device=_device(pipe),
                                                                   num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=cfg)
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    projection = (int(pipe.text_encoder_2.config.projection_dim) if pipe.text_encoder_2 is not None
                  else int(pooled.shape[-1]))
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype, text_encoder_projection_dim=projection)
    cond = pack_text_conditioning(embeds, pooled, ids.repeat(len(prompts), 1))
    return cond, None if not cfg else pack_text_conditioning(negative, negative_pooled, ids.repeat(len(negative), 1))


def _sd3(pipe: Any, prompts: list[str], cfg: bool, msl: int | None, _g: float | None) -> Encoded:
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, device=_device(pipe), do_classifier_free_guidance=cfg, max_sequence_length=msl)
    return (pack_text_conditioning(embeds, pooled),
            None if not cfg else pack_text_conditioning(negative, negative_pooled))


def _flux(pipe: Any, prompts: list[str], cfg: bool, msl: int | None, guidance: float | None) -> Encoded:
    def encode(texts: list[str]) -> torch.Tensor:
        embeds, pooled, _ = pipe.encode_prompt(texts, None, device=_device(pipe), max_sequence_length=msl)
        extras = [pooled] if guidance is None else [pooled, pooled.new_full((len(texts), 1), float(guidance))]
        return pack_text_conditioning(embeds, *extras)

    return encode(prompts), encode([""]) if cfg else None  # true CFG's negative prompt: the empty one


def _pixart(pipe: Any, prompts: list[str], cfg: bool, msl: int | None, _g: float | None) -> Encoded:
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=cfg, negative_prompt="", device=_device(pipe),
        clean_caption=call_default(type(pipe).__name__, "clean_caption"), max_sequence_length=msl)
    added: list[torch.Tensor] = []
    if getattr(pipe.transformer, "use_additional_conditions", False):  # PixArt-α at 1024: size and aspect
        height = width = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        added = [torch.tensor([[float(height), float(width)]]), torch.tensor([[float(height / width)]])]

    def pack(e: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return pack_text_conditioning(e, m.to(e.dtype), *(a.to(e).repeat(len(e), 1) for a in added))

    return pack(embeds, mask), None if not cfg else pack(negative, negative_mask)


def _sana(pipe: Any, prompts: list[str], cfg: bool, msl: int | None, _g: float | None) -> Encoded:
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=cfg, negative_prompt="", device=_device(pipe),
        clean_caption=call_default("SanaPipeline", "clean_caption"), max_sequence_length=msl,
        complex_human_instruction=call_default("SanaPipeline", "complex_human_instruction"))
    return (pack_text_conditioning(embeds, mask.to(embeds.dtype)),
            None if not cfg else pack_text_conditioning(negative, negative_mask.to(negative.dtype)))


_ENCODERS = {"StableDiffusionPipeline": _sd, "StableDiffusionXLPipeline": _sdxl, "StableDiffusion3Pipeline": _sd3,
             "FluxPipeline": _flux, "PixArtAlphaPipeline": _pixart, "PixArtSigmaPipeline": _pixart,
             "SanaPipeline": _sana}


def encoding_key(pipeline_class: str, prompts: Sequence[str], settings: Mapping[str, Any],
                 part_dirs: Sequence[Path]) -> str:
    """sha256 of what decides an encoding: the pipeline class, the prompts, the settings, and the files of
    the text encoders and tokenizers (name, size, modification time: a changed or replaced file is a miss)."""
    files = []
    for folder in sorted(part_dirs):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            files.append([str(path.relative_to(folder.parent)), stat.st_size, stat.st_mtime_ns])
    payload = {"pipeline": pipeline_class, "prompts": list(prompts), "settings": dict(settings), "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_encoding(cache_dir: str | Path | None, key: str,
                    encode: Callable[[], tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]]
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """encode()'s (cond, uncond, record), read from `cache_dir/<key>.safetensors` when an earlier job wrote
    it, else computed and written there (atomically); no cache_dir: computed each time."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    if cache_dir is None:
        return encode()
    path = Path(cache_dir).expanduser() / f"{key}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:  # the record is in the file's metadata
                record = json.loads((handle.metadata() or {})["record"])
                names = set(handle.keys())
                cond = handle.get_tensor("cond")
                uncond = handle.get_tensor("uncond") if "uncond" in names else None
            log.info("dq: prompt embeddings from the cache: %s", path)
            return cond, uncond, record
        except (OSError, KeyError, ValueError, SafetensorError) as err:  # a damaged entry is recomputed
            log.warning("dq: prompt embeddings cache entry %s is unreadable (%s): encoding again", path, err)
    start = time.perf_counter()
    cond, uncond, record = encode()
    tensors = {"cond": cond.contiguous()} if uncond is None else {"cond": cond.contiguous(),
                                                                  "uncond": uncond.contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"record": json.dumps(record)}))
    log.info("dq: encoded %d prompts with %s in %.1f s; cached at %s", len(cond), record.get("pipeline"),
             time.perf_counter() - start, path)
    return cond, uncond, record
