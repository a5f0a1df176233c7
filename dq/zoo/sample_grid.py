"""Sample a grid of images from a model config and write it as a PNG (the README's digit grid).

    python -m dq.zoo.sample_grid --out docs/digits_grid.png
    python -m dq.zoo.sample_grid --model-config conf/model/local.yaml --path /dir --out grid.png

Uses the sampler settings of the model config (for the embedded model: DDIM, 25 steps, eta 0, quad
spacing) and prints the sampling time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from dq import cli
from dq.errors import MissingFileError
from dq.sampling.grid import image_grid, write_png
from dq.sampling.sampler import sample
from dq.zoo.bundle import load_model


@cli.entry
def main(argv: list[str]) -> None:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--model-config", type=Path, default=Path("conf/model/embedded.yaml"))
    parser.add_argument("--path", default=None, help="model folder (for conf/model/local.yaml)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--cols", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scale", type=int, default=4, help="pixel enlargement in the PNG")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    if not args.model_config.is_file():
        raise MissingFileError(f"model config {args.model_config} not found (run from the repository root)")
    model_cfg = OmegaConf.load(args.model_config)
    if args.path is not None:
        model_cfg.path = args.path
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(model_cfg)
    unet, scheduler, sampler = model.unet, model.scheduler, model.sampler
    start = time.perf_counter()
    images = sample(unet, scheduler.config, sampler, args.rows * args.cols, seed=args.seed, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    write_png(image_grid(images, args.rows, args.scale), args.out)
    print(f"{args.rows * args.cols} samples ({sampler.name}, {sampler.num_steps} steps, eta {sampler.eta}, "
          f"{sampler.spacing} spacing, seed {args.seed}) in {elapsed:.1f} s on {torch.get_num_threads()} "
          f"threads -> {args.out}")


if __name__ == "__main__":
    main()
