"""A model config's conditioning (`model.conditioning`) as the tensors calibration, sampling and evaluation
take: class labels, or text embeddings from the FP text encoder, with the unconditional ones for CFG.

    conditioning = model_conditioning(cfg.model, components, limit=256)
    CalibrationDataModule(..., **conditioning.datamodule_kwargs())
    cond, uncond = conditioning.for_indices(torch.arange(8))     # sample / trajectory k: class or prompt k % P

model.conditioning keys: num_classes / uncond_class (class-conditional: sample k gets class k % num_classes,
uncond_class is the "null" class of classifier-free guidance), prompts_file (text-conditional: a text file
with one prompt a line, or a COCO captions JSON such as captions_val2014.json), prompt_embeds_file (text
embeddings computed elsewhere: a safetensors file with prompt_embeds [P, L, D] and optionally uncond_embeds
[1, L, D]), max_prompts (the first P). This is the one home of a model's conditioning: calibration, the
fidelity check, evaluation (and its CLIP score's prompts) and export all read it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from dq.arch.text_conditioning import pack_text_conditioning, text_fields
from dq.calibration import trajectory_conditioning
from dq.errors import CorruptFileError, MissingFileError, UserError
from dq.zoo.components import ModelComponents, load_text_parts
from dq.zoo.loading import read_layout
from dq.zoo.prompts import cached_encoding, encode_with_pipeline, encoding_key

CONDITIONING_KEYS = ("num_classes", "uncond_class", "prompts_file", "prompt_embeds_file", "max_prompts",
                     "max_sequence_length", "distilled_guidance", "cache_dir", "prompts")


class ModelConditioning(NamedTuple):
    num_classes: int | None = None
    uncond_class: int | None = None
    prompt_embeds: torch.Tensor | None = None  # float32 [P, L, D]
    uncond_embeds: torch.Tensor | None = None  # float32 [1, L, D]
    prompts: tuple[str, ...] = ()  # the P prompts of prompt_embeds (text models), for the CLIP score
    source: str | None = None  # the prompts file, for the protocol
    embeds_file: dict[str, Any] | None = None  # prompt_embeds_file: {file, sha256, num_prompts}
    encoding: dict[str, Any] | None = None  # how the prompts were encoded: {pipeline, max_sequence_length, ...}

    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None or self.prompt_embeds is not None

    def datamodule_kwargs(self) -> dict[str, Any]:
        """The CalibrationDataModule arguments (num_classes, uncond_class, prompt_embeds, uncond_embeds)."""
        if self.prompt_embeds is not None:  # class labels already turned into embeddings: pass those only
            return {"prompt_embeds": self.prompt_embeds, "uncond_embeds": self.uncond_embeds}
        return {"num_classes": self.num_classes, "uncond_class": self.uncond_class}

    def for_indices(self, indices: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(cond, uncond) for sample indices int64 [B]: labels int64 [B] or embeddings [B, L, D]; (None,
        None) for an unconditional model."""
        if not self.is_conditional:
            return None, None
        return trajectory_conditioning(indices, **self.datamodule_kwargs())

    def indexer(self) -> Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]] | None:
        """for_indices for a conditional model, None for an unconditional one (what samplers take)."""
        return self.for_indices if self.is_conditional else None

    def record(self) -> dict[str, Any]:
        """What the protocol of a result says about the conditioning."""
        if not self.is_conditional:
            return {}
        record: dict[str, Any] = {"num_classes": self.num_classes, "uncond_class": self.uncond_class}
        if self.prompts:
            record.update(prompts_file=self.source, num_prompts=len(self.prompts))
        if self.embeds_file is not None:
            record["prompt_embeds"] = self.embeds_file
        if self.encoding is not None:
            record["encoding"] = self.encoding
        return record


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """The prompts of a text file (one a line, blank lines skipped) or of a COCO captions JSON (the first
    caption of each image, in file order), at most `limit`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"prompts file {path} does not exist (model.conditioning.prompts_file)")
    if path.suffix == ".json":
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or not isinstance(payload.get("annotations"), list):
            raise UserError(f"{path} is not a COCO captions file: expected an object with an `annotations` list")
        seen: set[Any] = set()
        prompts = []
        for annotation in payload["annotations"]:
            if annotation.get("image_id") not in seen:  # one caption per image, as the 10k-prompt protocol
                seen.add(annotation.get("image_id"))
                prompts.append(str(annotation["caption"]).strip())
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts")
    return prompts


def read_prompt_embeds(path: str | Path, limit: int | None = None, denoiser: nn.Module | None = None
                       ) -> ModelConditioning:
    """The conditioning of a prompt-embeddings file (prompt_embeds [P, L, D], optional uncond_embeds
    [1, L, D]), the first `limit` prompts. For a denoiser that reads an attention mask (PixArt, Sana), the
    file's prompt_attention_mask [P, L] and uncond_attention_mask [1, L] are packed with the embeddings,
    or every token is attended when the file has none; SD3, Flux and SDXL files hold the packed tensors."""
    from safetensors.torch import load_file

    from dq.io import file_sha256

    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"prompt embeddings file {path} does not exist (model.conditioning.prompt_embeds_file)")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise CorruptFileError(f"{path} is not a readable safetensors file: {err}") from err
    embeds, uncond = tensors.get("prompt_embeds"), tensors.get("uncond_embeds")
    if embeds is None or embeds.ndim != 3 or len(embeds) == 0:
        raise UserError(f"{path} holds {sorted(tensors)}; expected prompt_embeds [P, L, D]")
    if uncond is not None and (uncond.shape[0] != 1 or uncond.shape[1:] != embeds.shape[1:]):
        raise UserError(f"{path}: uncond_embeds must be [1, L, D] like prompt_embeds' rows, got {tuple(uncond.shape)}")
    embeds = embeds[:limit] if limit is not None else embeds
    if _reads_mask(denoiser):
        embeds = _with_mask(embeds, tensors.get("prompt_attention_mask"), path)
        uncond = None if uncond is None else _with_mask(uncond, tensors.get("uncond_attention_mask"), path)
    record = {"file": str(path), "sha256": file_sha256(path), "num_prompts": int(embeds.shape[0])}
    return ModelConditioning(None, None, embeds.float(), None if uncond is None else uncond.float(),
                             embeds_file=record)


def _prompt_list(values: Any, limit: int | None) -> list[str]:
    """model.conditioning.prompts as a list of prompts (the first `limit`): a one-line error unless it is a
    non-empty list of non-empty strings."""
    if isinstance(values, str) or not all(isinstance(v, str) and v.strip() for v in values) or not len(values):
        raise UserError("model.conditioning.prompts must be a non-empty list of prompts, e.g. "
                        "'model.conditioning.prompts=[a red car,two dogs]'")
    prompts = [str(v).strip() for v in values]
    return prompts[:limit] if limit is not None else prompts


def _reads_mask(denoiser: nn.Module | None) -> bool:
    """Whether a denoiser's call reads an attention mask beside the embeddings, and nothing else (PixArt, Sana)."""
    return denoiser is not None and [name for name, _ in text_fields(denoiser)] == ["mask"]


def _with_mask(embeds: torch.Tensor, mask: torch.Tensor | None, path: Path) -> torch.Tensor:
    """embeds [P, L, D] packed with their attention mask [>= P, L] (all ones when None)."""
    if mask is None:
        mask = torch.ones(embeds.shape[:2])
    if mask.ndim != 2 or mask.shape[1] != embeds.shape[1] or len(mask) < len(embeds):
        raise UserError(f"{path}: an attention mask must be [P, L] like the embeddings' rows, got {tuple(mask.shape)}")
    return pack_text_conditioning(embeds.float(), mask[: len(embeds)].float())


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer: Any, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """float32 [P, L, D] on the CPU: the text encoder's last hidden states for each prompt, padded to the
    tokenizer's model_max_length L (77 for CLIP), as Stable Diffusion's pipeline conditions the UNet."""
    device = next(text_encoder.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        out.append(text_encoder(tokens.input_ids.to(device))[0].float().cpu())
    return torch.cat(out)


def model_conditioning(model_cfg: Mapping[str, Any], components: ModelComponents, limit: int | None = None,
                       denoiser: nn.Module | None = None, scheduler: Any = None, folder: Path | None = None,
                       device: torch.device | str | None = None) -> ModelConditioning:
    """The conditioning of `model_cfg.conditioning` with the model's FP components; `limit`: encode only
    the first prompts (sample k uses prompt k % P, so P = the number of samples gives the same tensors).
    Text prompts are encoded by the folder's pipeline around `denoiser` and `scheduler` (`dq.zoo.prompts`),
    packed as the denoiser's call takes them (dq.arch.text_conditioning), and cached under
    model.conditioning.cache_dir (keyed by `dq.zoo.prompts.encoding_key`; the text parts' files are read in
    `folder`); the text encoders run on `device` (None: where they were loaded, the CPU)."""
    settings = dict(model_cfg.get("conditioning") or {})
    unknown = sorted(set(settings) - set(CONDITIONING_KEYS))
    if unknown:
        raise UserError(f"unknown model.conditioning key(s) {unknown}; expected some of {list(CONDITIONING_KEYS)}")
    num_classes, uncond_class = settings.get("num_classes"), settings.get("uncond_class")
    prompts_file, max_prompts = settings.get("prompts_file"), settings.get("max_prompts")
    if uncond_class is not None and num_classes is None:
        raise UserError("model.conditioning.uncond_class is set but num_classes is not")
    embeds_file, prompt_list = settings.get("prompt_embeds_file"), settings.get("prompts")
    chosen = [k for k, v in (("num_classes", num_classes), ("prompts_file", prompts_file), ("prompts", prompt_list),
                             ("prompt_embeds_file", embeds_file)) if v is not None]
    if len(chosen) > 1:
        raise UserError(f"model.conditioning sets {' and '.join(chosen)}; a model takes one of them")
    if embeds_file is not None:
        limits = [int(v) for v in (max_prompts, limit) if v is not None]
        return read_prompt_embeds(embeds_file, min(limits) if limits else None, denoiser)
    if prompts_file is not None or prompt_list is not None:
        given = f"prompts_file={prompts_file}" if prompts_file is not None else "prompts"
        if not components.text_names:
            raise UserError(f"model.conditioning.{given} needs a text_encoder/ + tokenizer/ in the model folder")
        limits = [int(v) for v in (max_prompts, limit) if v is not None]
        if prompts_file is not None:
            prompts = read_prompts(prompts_file, min(limits) if limits else None)
        else:
            prompts = _prompt_list(prompt_list, min(limits) if limits else None)
            prompts_file = "model.conditioning.prompts"
        if denoiser is None:  # no denoiser to build a pipeline around: CLIP's last hidden states (SD 1.x / 2.x)
            embeds = encode_prompts(components.text_encoder, components.tokenizer, prompts)
            uncond = encode_prompts(components.text_encoder, components.tokenizer, [""])  # CFG's empty prompt
            return ModelConditioning(None, None, embeds, uncond, tuple(prompts), str(prompts_file))
        pipeline_class = components.pipeline_class or "StableDiffusionPipeline"  # an SD folder saved part by part
        options = {"guidance": pipeline_class != "FluxPipeline",
                   "max_sequence_length": settings.get("max_sequence_length"),
                   "distilled_guidance": settings.get("distilled_guidance")}
        part_dirs = [folder / name for name in components.text_names] if folder is not None else []
        key = encoding_key(pipeline_class, prompts, {**options, "index": components.index}, part_dirs)
        cache_dir = settings.get("cache_dir") if folder is not None else None

        def encode() -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
            # the text encoders are read from disk only here, on a cache miss, and dropped after it
            text = components.text_parts
            if text is None:
                text = load_text_parts(folder, read_layout(folder), variant=model_cfg.get("variant"),
                                       dtype=model_cfg.get("dtype"))
            parts = {**text, "vae": components.vae, "scheduler": scheduler}
            return encode_with_pipeline(pipeline_class, parts, denoiser, prompts, index=components.index,
                                        device=device, **options)

        embeds, uncond, encoding = cached_encoding(cache_dir, key, encode)
        return ModelConditioning(None, None, embeds, uncond, tuple(prompts), str(prompts_file), encoding=encoding)
    if components.text_names:
        raise UserError("this model has a text encoder: set model.conditioning.prompts_file (one prompt a line, "
                         "or a COCO captions JSON) or model.conditioning.prompts (a list)")
    if num_classes is None:
        return ModelConditioning()
    num_classes = int(num_classes)
    uncond_class = None if uncond_class is None else int(uncond_class)
    table = components.class_embeddings
    if table is None:  # the UNet embeds labels itself (class_embed_type / num_class_embeds)
        return ModelConditioning(num_classes, uncond_class)
    needed = max(num_classes, (uncond_class or 0) + 1)
    if len(table) < needed:
        raise UserError(f"class_embedder has {len(table)} rows; num_classes={num_classes}, uncond_class="
                         f"{uncond_class} need {needed}")
    # LDM cin256: the label's embedding is the cross-attention context, one token: [K, 1, D]; a table
    # [K + 1, L, D] gives each label a caption of L tokens (dq's embedded PixArt)
    rows = table if table.ndim == 3 else table[:, None, :]
    embeds = rows[:num_classes].clone()
    uncond = None if uncond_class is None else rows[uncond_class][None].clone()
    if _reads_mask(denoiser):  # every token of a caption attended
        embeds = pack_text_conditioning(embeds, torch.ones(embeds.shape[:2]))
        uncond = None if uncond is None else pack_text_conditioning(uncond, torch.ones(uncond.shape[:2]))
    return ModelConditioning(num_classes, uncond_class, embeds, uncond)
