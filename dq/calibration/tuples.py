"""Calibration tuples as plain functions: which (trajectory, step) pairs to keep, generating a shard of
trajectories, the cache key, and safetensors I/O. The LightningDataModule is the shell around these.

A tuple set is a dict of tensors with N rows, in canonical (trajectory, step) order:
    x_t       float32 [N, C, H, W]   the model input at that step
    timestep  int64   [N]            the scheduler timestep value t
    step      int64   [N]            the step index i (0 = the noisiest step)
    cond      int64 [N] (class labels) or float32 [N, L, D] (text embeddings)   where conditioning exists
    uncond    like cond                                                         where guidance is used

Text embeddings are stored once per prompt: `cond_table` float32 [P + 1, L, D] holds the P prompts' embeddings
and the unconditional one last, and `cond_index` / `uncond_index` int64 [N] say which row each tuple takes (so a
[N, L, D] tensor of repeated prompts is never built: 48 GB for PixArt-Σ at N = 5,120). `select_rows` gives any
rows of either form as the plain one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dq.arch import sample_shape
from dq.errors import CorruptFileError, UserError
from dq.io import atomic_write, seeded_generator, stable_key, write_json
from dq.sampling import SamplerConfig, sample

CACHE_FORMAT_VERSION = 1
METADATA_KEY = "dq_calibration"


def draw_plan(num_trajectories: int, num_steps: int, num_samples: int, seed: int) -> torch.Tensor:
    """int64 [num_samples, 2] of (trajectory k, step i) pairs, sorted by (k, i).

    The draw is stratified over steps so that every step index is covered: each step gets
    floor(N / M) or ceil(N / M) tuples (which steps get one more is random), from trajectories drawn at
    random without replacement. A pure function of its arguments: the same on every rank.
    """
    if num_samples < 1 or num_steps < 1 or num_trajectories < 1:
        raise UserError(
            f"num_samples, num_steps and num_trajectories must be >= 1, got {num_samples}, {num_steps}, {num_trajectories}"
        )
    per_step_max = -(-num_samples // num_steps)
    if per_step_max > num_trajectories:
        raise UserError(
            f"{num_samples} tuples over {num_steps} steps need >= {per_step_max} trajectories, got {num_trajectories}"
        )
    generator = seeded_generator("dq-calibration-plan", int(seed))
    counts = torch.full((num_steps,), num_samples // num_steps, dtype=torch.int64)
    counts[torch.randperm(num_steps, generator=generator)[: num_samples % num_steps]] += 1
    pairs = []
    for step in range(num_steps):
        trajectories = torch.randperm(num_trajectories, generator=generator)[: int(counts[step])]
        pairs.append(torch.stack([trajectories, torch.full_like(trajectories, step)], dim=1))
    plan = torch.cat(pairs)
    order = torch.argsort(plan[:, 0] * num_steps + plan[:, 1])
    return plan[order]


def shard_range(num_trajectories: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop): the contiguous block of trajectories rank `rank` of `world_size` generates."""
    if not 0 <= rank < world_size:
        raise UserError(f"rank must lie in [0, {world_size}), got {rank}")
    return (num_trajectories * rank // world_size, num_trajectories * (rank + 1) // world_size)


def trajectory_conditioning(
    trajectories: torch.Tensor,
    num_classes: int | None = None,
    uncond_class: int | None = None,
    prompt_embeds: torch.Tensor | None = None,
    uncond_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cond, uncond) for trajectory indices int64 [B]: class k % num_classes (int64 [B]) or prompt
    embedding k % P of prompt_embeds [P, L, D] (float [B, L, D]); uncond: uncond_class as int64 [B], or
    uncond_embeds [1, L, D] expanded to [B, L, D]; None where not given."""
    if num_classes is not None and prompt_embeds is not None:
        raise UserError("give num_classes (class-conditional) or prompt_embeds (text-conditional), not both")
    if num_classes is not None:
        if num_classes < 1:
            raise UserError(f"num_classes must be >= 1, got {num_classes}")
        if uncond_embeds is not None:
            raise UserError("a class-conditional model takes uncond_class, not uncond_embeds")
        cond = trajectories % num_classes
        uncond = None if uncond_class is None else torch.full_like(trajectories, int(uncond_class))
        return cond, uncond
    if prompt_embeds is not None:
        if prompt_embeds.ndim != 3:
            raise UserError(f"prompt_embeds must be [P, L, D], got shape {tuple(prompt_embeds.shape)}")
        if uncond_class is not None:
            raise UserError("a text-conditional model takes uncond_embeds, not uncond_class")
        cond = prompt_embeds[trajectories % prompt_embeds.shape[0]].float()
        uncond = None
        if uncond_embeds is not None:
            if uncond_embeds.ndim != 3 or uncond_embeds.shape[0] != 1 or uncond_embeds.shape[1:] != prompt_embeds.shape[1:]:
                raise UserError(
                    f"uncond_embeds must be [1, {prompt_embeds.shape[1]}, {prompt_embeds.shape[2]}], "
                    f"got shape {tuple(uncond_embeds.shape)}"
                )
            uncond = uncond_embeds.float().expand(len(trajectories), -1, -1)
        return cond, uncond
    if uncond_class is not None or uncond_embeds is not None:
        raise UserError("unconditional conditioning given for a model without conditioning")
    return None, None


def generate_shard(
    unet: nn.Module,
    scheduler_config: Mapping[str, Any],
    sampler: SamplerConfig,
    plan: torch.Tensor,
    timesteps: torch.Tensor,
    trajectory_range: tuple[int, int],
    *,
    seed: int,
    batch_size: int = 64,
    conditioning: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The tuples of `plan` [N, 2] whose trajectory lies in trajectory_range = [start, stop), in plan order.

    Samples trajectories start..stop-1 (trajectory k seeded by (seed, k), as `dq.sampling.sample` does)
    and keeps the model input x_t at the planned steps. timesteps: int64 [M], the planned call timesteps.
    """
    start, stop = trajectory_range
    conditioning = dict(conditioning or {})
    rows = torch.nonzero((plan[:, 0] >= start) & (plan[:, 0] < stop)).flatten()
    local_plan = plan[rows]
    num_steps = len(timesteps)
    row_of = torch.full((max(stop - start, 0), num_steps), -1, dtype=torch.int64)
    row_of[local_plan[:, 0] - start, local_plan[:, 1]] = torch.arange(len(local_plan))
    channels, height, width = sample_shape(unet)
    x_t = torch.empty((len(local_plan), channels, height, width), dtype=torch.float32)
    filled = torch.zeros(len(local_plan), dtype=torch.bool)

    def record(step_index: int, timestep: int, model_input: torch.Tensor, sample_indices: torch.Tensor) -> None:
        if int(timesteps[step_index]) != timestep:
            raise UserError(f"step {step_index} ran at timestep {timestep}, planned {int(timesteps[step_index])}")
        targets = row_of[sample_indices - start, step_index]
        keep = targets >= 0
        if bool(keep.any()):
            x_t[targets[keep]] = model_input[keep.to(model_input.device)].float().cpu()
            filled[targets[keep]] = True

    if stop > start:
        trajectories = torch.arange(start, stop, dtype=torch.int64)
        cond, uncond = trajectory_conditioning(trajectories, **conditioning)
        sample(unet, scheduler_config, sampler, stop - start, seed=seed, first_index=start, batch_size=batch_size,
               cond=cond, uncond=uncond, on_step=record, progress=progress)
    if not bool(filled.all()):
        raise UserError(f"{int((~filled).sum())} planned tuples were not visited by the sampler")
    tuples = {
        "x_t": x_t,
        "timestep": timesteps[local_plan[:, 1]].clone(),
        "step": local_plan[:, 1].clone(),
    }
    prompts = conditioning.get("prompt_embeds")
    if prompts is not None:  # text embeddings: one table row per prompt, the unconditional one last
        uncond_embeds = conditioning.get("uncond_embeds")
        tuples[TABLE_KEY] = torch.cat([prompts.float(), *([] if uncond_embeds is None else [uncond_embeds.float()])])
        tuples["cond_index"] = local_plan[:, 0] % prompts.shape[0]
        if uncond_embeds is not None and sampler.uses_guidance:
            tuples["uncond_index"] = torch.full_like(local_plan[:, 0], prompts.shape[0])
        trajectory_conditioning(local_plan[:, 0][:1], **conditioning)  # the same checks of the embeddings
        return tuples
    cond, uncond = trajectory_conditioning(local_plan[:, 0], **conditioning)
    if cond is not None:
        tuples["cond"] = cond.contiguous()
    if uncond is not None and sampler.uses_guidance:
        tuples["uncond"] = uncond.contiguous()
    return tuples


TABLE_KEY = "cond_table"


def select_rows(tuples: Mapping[str, torch.Tensor], rows: torch.Tensor | slice | int) -> dict[str, torch.Tensor]:
    """Rows `rows` of a tuple set, with the conditioning table (if any) looked up: always the plain keys
    (x_t, timestep, step, and cond / uncond where present)."""
    table = tuples.get(TABLE_KEY)
    out = {}
    for key, value in tuples.items():
        if key == TABLE_KEY:
            continue
        if table is not None and key in ("cond_index", "uncond_index"):
            index = value[rows]
            out[key[: -len("_index")]] = table[index.to(table.device)]
        else:
            out[key] = value[rows]
    return out


def model_fingerprint(unet: nn.Module, scheduler_config: Mapping[str, Any]) -> str:
    """Hex digest of the model's config, its weights (every tensor of the state dict, bytes included) and
    the scheduler config: the model's identity in calibration cache keys."""
    digest = hashlib.blake2b(digest_size=16)
    for config in (dict(getattr(unet, "config", {})), dict(scheduler_config)):
        digest.update(json.dumps(_identity_fields(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def _identity_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config without its bookkeeping keys (`_use_default_values` is a list in set order, so it
    differs between processes), keeping `_class_name`."""
    return {key: value for key, value in config.items() if key == "_class_name" or not key.startswith("_")}


def calibration_cache_key(identity: Mapping[str, Any]) -> str:
    """A short hex key for a JSON-serialisable description of what the tuples depend on."""
    return stable_key({"format_version": CACHE_FORMAT_VERSION, **identity})


def content_hash(tuples: Mapping[str, torch.Tensor]) -> str:
    """Hex digest of every tensor (name, dtype, shape and bytes): the check that a cache file was read back
    whole (safetensors checks its header, not its data)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tuples):
        tensor = tuples[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()


def save_tuples(path: str | Path, tuples: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write tuples to `path` (safetensors, metadata JSON in its header, with the tensors' content hash) and
    a readable `<path>.json` copy of the metadata; each file is written beside its target and renamed into
    place, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**metadata, "content_hash": content_hash(tuples)}
    metadata_json = json.dumps(dict(metadata), sort_keys=True, default=str)
    atomic_write(path, lambda tmp: save_file({name: tensor.contiguous() for name, tensor in tuples.items()}, tmp,
                                             metadata={METADATA_KEY: metadata_json}))
    write_json(path.with_name(path.name + ".json"), dict(metadata), sort_keys=True, default=str)


def load_tuples(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tuples, metadata) from a file written by `save_tuples`. CorruptFileError when the file cannot be
    read (truncated, bytes flipped), is not a dq calibration cache, or its tensors differ from the content
    hash it records."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if METADATA_KEY not in header:
                raise CorruptFileError(f"{path} has no {METADATA_KEY!r} metadata: not a dq calibration cache")
            tuples = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = json.loads(header[METADATA_KEY])
    except (CorruptFileError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors' SafetensorError, a JSON error in the header, a short read
        raise CorruptFileError(f"{path} is not a readable calibration cache (truncated or corrupted?): "
                               f"{type(err).__name__}: {err}") from err
    recorded = metadata.get("content_hash") if isinstance(metadata, dict) else None
    if recorded is not None and recorded != content_hash(tuples):
        raise CorruptFileError(f"{path}: its tensors do not match the content hash it records (bytes changed)")
    return tuples, metadata

