"""Calibration data (docs/method.md §5): tuples (x_t, timestep, step, cond, uncond) drawn from the FP model's
own sampling trajectories, cached on disk, served by a LightningDataModule."""

from dq.calibration.datamodule import CalibrationDataModule, CalibrationTuples
from dq.calibration.tuples import (
    calibration_cache_key,
    draw_plan,
    generate_shard,
    load_tuples,
    model_fingerprint,
    save_tuples,
    select_rows,
    shard_range,
    trajectory_conditioning,
)

__all__ = [
    "CalibrationDataModule",
    "CalibrationTuples",
    "calibration_cache_key",
    "draw_plan",
    "generate_shard",
    "load_tuples",
    "model_fingerprint",
    "save_tuples",
    "select_rows",
    "shard_range",
    "trajectory_conditioning",
]
