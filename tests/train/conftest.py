"""A tiny diffusers model folder and Hydra composition helpers for the train.py tests."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.conftest import write_model_folder
from tests.quant.conftest import tiny_unet2d

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_model_folder(tiny_unet2d(), tmp_path_factory.mktemp("tiny_model"))


def fast_overrides(model_dir: Path, out: Path, cache: Path, iters: int | None = 2,
                   end_to_end: int | None = 2, checkpoint_every: int = 1000) -> list[str]:
    """A run of a few seconds: tiny model, 4 sampling steps, 32 calibration tuples, `iters` iterations a
    block and `end_to_end` in the end-to-end stage (None: the method's own counts, for the methods that do
    not train or train end to end only). The resume point is written after each block, and every
    `checkpoint_every` iterations inside one (1 only for the tests that stop a run mid-block: writing a
    checkpoint of the tiny model took longer than its training step, 0.2 s against 0.12 s)."""
    return [
        "model=local",
        f"model.path={model_dir}",
        "model.sampler.num_steps=4",
        f"output_dir={out}",
        f"data.cache_dir={cache}",
        "data.num_samples=32",
        "data.num_trajectories=8",
        "data.progress=false",
        "method.distill.batch_size=8",
        "method.distill.capture_batch_size=32",
        "fidelity.num_samples=4",
        "fidelity.batch_size=4",
        "progress_bar=false",
        f"checkpoint_every_n_steps={checkpoint_every}",
        *([] if iters is None else [f"method.distill.iters_per_block={iters}"]),
        *([] if iters is None or end_to_end is None else [f"method.distill.end_to_end_iters={end_to_end}"]),
    ]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)
