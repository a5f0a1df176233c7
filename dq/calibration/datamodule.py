"""The calibration LightningDataModule: generates (or reuses) the cached tuples, then serves batches.

    dm = CalibrationDataModule(unet, scheduler.config, sampler, num_samples=5120, cache_dir=".cache/dq/calibration")
    tuples = dm.load()               # setup + tuples; BlockDistiller calls it on every rank
    batch = next(iter(dm.train_dataloader()))   # {"x_t": [B, C, H, W], "timestep": [B], "step": [B], ...}

Under DDP each rank samples its block of trajectories and writes it as a shard file; rank 0 merges the
shards into the cache and every rank reads the result (the cache directory must be shared by the ranks).
Trajectory k is seeded by (seed, k), so the tuples do not depend on the world size.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

import dq
from dq.calibration.tuples import (
    CACHE_FORMAT_VERSION,
    TABLE_KEY,
    calibration_cache_key,
    draw_plan,
    generate_shard,
    load_tuples,
    model_fingerprint,
    save_tuples,
    select_rows,
    shard_range,
)
from dq.errors import CorruptFileError, UserError
from dq.io import remove_stale_staging
from dq.sampling import SamplerConfig, planned_timesteps

log = logging.getLogger(__name__)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `<path>.lock` (fcntl, released when the process dies): one writer per cache
    entry across processes that share the cache dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


REQUIRED_KEYS = ("x_t", "timestep", "step")


class CalibrationTuples(Dataset):
    """Row i of every tensor of a tuple set (see dq.calibration.tuples), as a dict."""

    def __init__(self, tuples: Mapping[str, torch.Tensor]) -> None:
        missing = [key for key in REQUIRED_KEYS if key not in tuples]
        if missing:
            raise UserError(f"calibration tuples lack {missing}; got keys {sorted(tuples)}")
        lengths = {key: len(tensor) for key, tensor in tuples.items() if key != TABLE_KEY}
        if len(set(lengths.values())) != 1:
            raise UserError(f"calibration tensors must have the same number of rows, got {lengths}")
        self.tuples = dict(tuples)
        self.length = lengths["x_t"]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return select_rows(self.tuples, index)


class CalibrationDataModule(L.LightningDataModule):
    """Calibration tuples from the FP model's sampling trajectories (docs/method.md §5).

    unet / scheduler_config / sampler: the FP teacher and the sampler whose trajectories are recorded (the
    evaluation sampler, so the steps match the student's TPQ tables).
    num_samples: N tuples, drawn over (trajectory, step) with every step covered (see `draw_plan`).
    num_trajectories: trajectories sampled (None: the fewest that can supply N, ceil(N / steps)).
    batch_size: training batch size; generation_batch_size: trajectories sampled at once.
    num_classes / uncond_class: class-conditional models (trajectory k gets class k % num_classes).
    prompt_embeds [P, L, D] / uncond_embeds [1, L, D]: text-conditional models (trajectory k: prompt k % P).
    cache_dir: where tuples are cached under a key of model weights, scheduler, sampler, N, trajectories,
    conditioning and seed. device: where to sample (None: the device given to `load`, else the model's);
    the model is moved there in place, as the Trainer would move it anyway.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler_config: Mapping[str, Any],
        sampler: SamplerConfig,
        *,
        num_samples: int = 5120,
        num_trajectories: int | None = 256,
        batch_size: int = 32,
        generation_batch_size: int = 64,
        seed: int = 0,
        cache_dir: str | Path = ".cache/dq/calibration",
        num_classes: int | None = None,
        uncond_class: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        uncond_embeds: torch.Tensor | None = None,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(sampler, SamplerConfig):
            sampler = SamplerConfig.from_mapping(sampler)
        if batch_size < 1 or generation_batch_size < 1:
            raise UserError(f"batch sizes must be >= 1, got {batch_size} and {generation_batch_size}")
        if sampler.uses_guidance and uncond_class is None and uncond_embeds is None:
            raise UserError(f"guidance_scale={sampler.guidance_scale} needs uncond_class or uncond_embeds")
        self.unet = unet
        self.scheduler_config = dict(scheduler_config)
        self.sampler = sampler
        self.timesteps = planned_timesteps(self.scheduler_config, sampler)
        steps = len(self.timesteps)
        self.num_samples = int(num_samples)
        self.num_trajectories = int(num_trajectories) if num_trajectories is not None else -(-self.num_samples // steps)
        self.batch_size = batch_size
        self.generation_batch_size = generation_batch_size
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir)
        self.conditioning: dict[str, Any] = {
            key: value
            for key, value in {
                "num_classes": num_classes,
                "uncond_class": uncond_class,
                "prompt_embeds": prompt_embeds,
                "uncond_embeds": uncond_embeds,
            }.items()
            if value is not None
        }
        self.num_workers = num_workers
        self.device = device
        self.progress = progress
        self.plan = draw_plan(self.num_trajectories, steps, self.num_samples, self.seed)  # checks N vs trajectories
        self.tuples: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, Any] | None = None
        # how setup found its tuples (one process): "read" from the cache, "generated", or "regenerated" after
        # the cache file failed to load; None under DDP or before setup
        self.cache_event: str | None = None
        self._identity: dict[str, Any] | None = None

    @property
    def guidance_scale(self) -> float | None:
        return self.sampler.guidance_scale

    def identity(self) -> dict[str, Any]:
        """What the tuples depend on; its hash is the cache key. Computed once (it hashes the model weights;
        train.py's checkpoint identity and setup both need it)."""
        if self._identity is None:
            self._identity = self._compute_identity()
        return self._identity

    def _compute_identity(self) -> dict[str, Any]:
        conditioning = {}
        for key, value in self.conditioning.items():
            if isinstance(value, torch.Tensor):
                value = hashlib.blake2b(value.detach().float().cpu().contiguous().numpy(), digest_size=16).hexdigest()
            conditioning[key] = value
        return {
            "model": model_fingerprint(self.unet, self.scheduler_config),
            "sampler": self.sampler.to_dict(),
            "timesteps": self.timesteps.tolist(),
            "num_samples": self.num_samples,
            "num_trajectories": self.num_trajectories,
            "seed": self.seed,
            "conditioning": conditioning,
        }

    def cache_path(self) -> Path:
        """The cache file of these tuples."""
        return self.cache_dir / f"calibration-{calibration_cache_key(self.identity())}.safetensors"

    def setup(self, stage: str | None = None) -> None:
        if self.tuples is not None:
            return
        identity = self.identity()
        path = self.cache_dir / f"calibration-{calibration_cache_key(identity)}.safetensors"
        self._check_same_key_on_all_ranks(path.name)
        _, world_size = self._rank_and_world_size()
        if world_size == 1:
            self.tuples, self.metadata = self._load_or_generate(path, identity)
            return
        found = path.is_file()
        self._barrier()  # every rank decides on the same state of the cache
        if not found:
            self._generate_into(path, identity)
        self.tuples, self.metadata = self._read_checked(path)

    def _read_checked(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The cache file's tuples; CorruptFileError when it is unreadable or holds another key."""
        tuples, metadata = load_tuples(path)
        expected_key = path.stem.removeprefix("calibration-")
        if metadata.get("key") != expected_key:
            raise CorruptFileError(f"{path} holds tuples for key {metadata.get('key')!r}, expected {expected_key!r}")
        return tuples, metadata

    def _load_or_generate(self, path: Path, identity: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """One process: read the cache, or generate it under a file lock (a second process sharing the cache
        dir waits, then reads what the first wrote). A cache that fails to load is moved aside to
        `<name>.corrupt` with one warning, and generated again."""
        with cache_lock(path):
            self.cache_event = "generated"
            if path.is_file():
                try:
                    tuples = self._read_checked(path)
                    self.cache_event = "read"
                    return tuples
                except CorruptFileError as err:
                    aside = path.with_name(path.name + ".corrupt")
                    os.replace(path, aside)
                    log.warning("dq: calibration cache %s is unusable (%s); moved aside to %s, generating it again",
                                path, err, aside.name)
                    self.cache_event = "regenerated"
            remove_stale_staging(path)
            self._generate_into(path, identity)
            return self._read_checked(path)

    def _generate_into(self, path: Path, identity: dict[str, Any]) -> None:
        rank, world_size = self._rank_and_world_size()
        unet = self.unet
        device = self._generation_device()
        if device is not None:
            unet = unet.to(device)
        was_training = unet.training
        unet.eval()
        try:
            shard = generate_shard(
                unet, self.scheduler_config, self.sampler, self.plan, self.timesteps,
                shard_range(self.num_trajectories, rank, world_size), seed=self.seed,
                batch_size=self.generation_batch_size, conditioning=self.conditioning,
                progress=self.progress and rank == 0,
            )
        finally:
            unet.train(was_training)
        metadata = {
            "key": path.stem.removeprefix("calibration-"),
            "format_version": CACHE_FORMAT_VERSION,
            "guidance_scale": self.sampler.guidance_scale,
            "num_model_calls": len(self.timesteps),
            "dq_version": dq.__version__,
            **identity,
        }
        if world_size == 1:
            save_tuples(path, shard, metadata)
            return
        shard_path = path.with_name(f"{path.stem}.rank{rank}-of-{world_size}.safetensors")
        save_tuples(shard_path, shard, {"key": metadata["key"], "rank": rank})
        self._barrier()
        if rank == 0:
            shard_paths = [path.with_name(f"{path.stem}.rank{r}-of-{world_size}.safetensors") for r in range(world_size)]
            missing = [str(p) for p in shard_paths if not p.is_file()]
            if missing:
                raise UserError(f"calibration shards {missing} not found: cache_dir must be shared by all ranks")
            shards = [load_tuples(p)[0] for p in shard_paths]
            # every shard holds the whole conditioning table: one copy of it, the rows joined
            merged = {key: shards[0][key] if key == TABLE_KEY else torch.cat([s[key] for s in shards]) for key in shards[0]}
            save_tuples(path, merged, metadata)
            for shard_file in shard_paths:
                shard_file.unlink()
                shard_file.with_name(shard_file.name + ".json").unlink()
        self._barrier()

    def _check_same_key_on_all_ranks(self, name: str) -> None:
        """ValueError on every rank when the ranks disagree on the cache file (different weights or
        settings per rank), instead of one rank failing and the others waiting forever."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        names: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(names, name)
        if len(set(names)) != 1:
            raise UserError(f"ranks disagree on the calibration data (model weights or settings differ): {names}")

    def load(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The tuples (setup, then `tuples`): what BlockDistiller calls in its own setup, on every rank.
        device: where to sample when the cache must be generated (the constructor's `device` wins; None:
        where the model is)."""
        if self.device is None and device is not None:
            self.device = device
        self.setup("fit")
        return self.tuples

    @staticmethod
    def _rank_and_world_size() -> tuple[int, int]:
        """This process's rank and the world size of the default process group (0, 1 without one)."""
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @staticmethod
    def _barrier() -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_backend() == "nccl":  # NCCL needs to know this rank's GPU
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def _generation_device(self) -> torch.device | None:
        return None if self.device is None else torch.device(self.device)

    def train_dataloader(self) -> DataLoader:
        if self.tuples is None:
            raise UserError("call setup() before train_dataloader() (the Trainer does it)")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(CalibrationTuples(self.tuples), batch_size=self.batch_size, shuffle=True,
                          generator=generator, num_workers=self.num_workers)
