"""Evaluation samples on disk: one PNG per sample index, resumable, the same for any number of ranks.

    folder/identity.json      what the samples depend on (model weights, sampler, seed, conditioning)
    folder/000000.png ...     sample k = the image of `dq.sampling.sample` with first_index k

Sample k's noise comes from its own generator (dq.sampling.sample_seed(seed, k)), so a rank can make any
subset of indices and a resumed run skips the PNGs already written: files are written whole (renamed
into place), so an interrupted run never leaves a half image behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dq.errors import UserError
from dq.io import atomic_write, stable_key
from dq.metrics.images import check_images, read_images, to_uint8
from dq.sampling import SamplerConfig, sample
from dq.sampling.grid import image_grid, write_png

IDENTITY_FILE = "identity.json"
SAMPLES_FORMAT_VERSION = 1
# conditioning(indices int64 [B]) -> (cond, uncond) for those samples (see dq.calibration.trajectory_conditioning)
log = logging.getLogger(__name__)
Conditioning = Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]


def sample_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def identity_key(identity: Mapping[str, Any]) -> str:
    """A short hex key of a JSON-serialisable identity (names the shared FP sample cache folders)."""
    return stable_key({"format_version": SAMPLES_FORMAT_VERSION, **identity})


def write_identity(folder: Path, identity: Mapping[str, Any]) -> None:
    """Create `folder` and its identity.json unless it exists (call on one rank, then check on all)."""
    path = folder / IDENTITY_FILE
    if not path.exists():
        text = json.dumps({"format_version": SAMPLES_FORMAT_VERSION, **identity}, indent=2, sort_keys=True, default=str)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def check_identity(folder: Path, identity: Mapping[str, Any]) -> None:
    """ValueError when `folder` holds samples of another model, sampler, seed or conditioning: resuming
    into it would mix two experiments."""
    path = folder / IDENTITY_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: the samples in {folder} cannot be attributed to a model")
    expected = json.loads(json.dumps({"format_version": SAMPLES_FORMAT_VERSION, **identity}, sort_keys=True, default=str))
    found = json.loads(path.read_text())
    if found != expected:
        differing = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise UserError(
            f"{folder} holds samples of another setting (differing: {differing}); use a new output dir "
            "(or delete that folder) instead of resuming into it"
        )


def missing_indices(folder: Path, indices: Sequence[int]) -> list[int]:
    return [k for k in indices if not sample_path(folder, k).is_file()]


def unreadable_samples(folder: Path, indices: Sequence[int]) -> list[int]:
    """Indices whose PNG exists but fails PIL's check (truncated, bytes changed: PNG chunks carry CRCs)."""
    bad = []
    for k in indices:
        path = sample_path(folder, k)
        if not path.is_file():
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:
            bad.append(k)
    return bad


def heal_samples(folder: Path, indices: Sequence[int]) -> list[int]:
    """Delete the unreadable PNGs among `indices` (with one warning naming the first) so that they are made
    again; returns their indices."""
    bad = unreadable_samples(folder, indices)
    if bad:
        log.warning("dq: %d unreadable sample PNG(s) in %s (first: %s); deleted, sampling them again", len(bad),
                    folder, sample_path(folder, bad[0]).name)
        for k in bad:
            sample_path(folder, k).unlink(missing_ok=True)
    return bad


def contiguous_runs(indices: Sequence[int], max_length: int) -> list[tuple[int, int]]:
    """[start, stop) runs of consecutive values of sorted `indices`, each at most max_length long."""
    runs: list[tuple[int, int]] = []
    for index in sorted(indices):
        if runs and runs[-1][1] == index and runs[-1][1] - runs[-1][0] < max_length:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def write_samples(folder: Path, images: torch.Tensor, first_index: int) -> None:
    """PNG files for uint8 images [B, C, H, W] with sample indices first_index .. first_index + B - 1."""
    check_images(images)
    for offset, image in enumerate(images):
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        write_png(np.ascontiguousarray(array), sample_path(folder, first_index + offset))


@torch.no_grad()
def generate_missing(
    folder: Path,
    unet: nn.Module,
    scheduler_config: Mapping[str, Any],
    sampler: SamplerConfig,
    indices: Sequence[int],
    *,
    seed: int,
    batch_size: int,
    conditioning: Conditioning | None = None,
    progress: bool = False,
    description: str = "samples",
    to_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Sample every index of `indices` without a PNG in `folder` and write it; returns how many were made.
    to_pixels: sampler output [B, C, H, W] -> images in [-1, 1] (a latent model's VAE decode)."""
    heal_samples(folder, indices)
    todo = missing_indices(folder, indices)
    with tqdm(total=len(todo), desc=description, disable=not progress or not todo, unit="img") as bar:
        for start, stop in contiguous_runs(todo, batch_size):
            ids = torch.arange(start, stop, dtype=torch.int64)
            cond, uncond = conditioning(ids) if conditioning is not None else (None, None)
            images = sample(unet, scheduler_config, sampler, stop - start, seed=seed, first_index=start,
                            batch_size=batch_size, cond=cond, uncond=uncond, progress=False)
            if to_pixels is not None:
                images = to_pixels(images)
            if images.shape[1] not in (1, 3):
                raise UserError(
                    f"the model makes {images.shape[1]}-channel samples (latents?); evaluation saves pixel images: "
                    "a latent model's folder needs its vae/ to decode them"
                )
            write_samples(folder, to_uint8(images), start)
            bar.update(stop - start)
    return len(todo)


def read_samples(folder: Path, num_samples: int) -> torch.Tensor:
    """uint8 [N, C, H, W]: samples 0 .. N - 1 of `folder`; ValueError naming missing indices."""
    missing = missing_indices(folder, range(num_samples))
    if missing:
        raise UserError(f"{folder} lacks {len(missing)} of {num_samples} samples (first missing: {missing[:5]})")
    return read_images([sample_path(folder, k) for k in range(num_samples)])


def write_npz(path: Path, images: torch.Tensor) -> None:
    """Samples as `arr_0`, uint8 [N, H, W, C]: the layout of guided-diffusion's evaluator and most FID tools."""
    check_images(images)
    array = images.permute(0, 2, 3, 1).contiguous().numpy()

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a file object keeps numpy from appending .npz to the temp name
            np.savez(handle, arr_0=array)

    atomic_write(path, save)


def write_grid(path: Path, images: torch.Tensor, rows: int, scale: int = 4) -> None:
    """A PNG grid of the first rows x rows samples (fewer rows when there are fewer samples)."""
    check_images(images)
    rows = max(1, min(rows, int(len(images) ** 0.5)))
    shown = images[: rows * rows].float() / 127.5 - 1.0
    write_png(image_grid(shown, rows, scale=scale), path)

