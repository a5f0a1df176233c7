"""Sample a grid of images from a model config and write it as a PNG (the README's digit grid).

    python -m dq.sampling.grid --out docs/digits_grid.png
    python -m dq.sampling.grid --model-config conf/model/local.yaml --path /dir --out grid.png

Uses the sampler settings of the model config (for the embedded model: DDIM, 25 steps, eta 0, quad
spacing) and prints the sampling time.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from dq import cli
from dq.errors import MissingFileError, UserError
from dq.sampling.sampler import sample
from dq.zoo import load_model


def image_grid(
    images: torch.Tensor, rows: int, scale: int = 1, padding: int = 1, padding_value: int = 128
) -> np.ndarray:
    """uint8 [rows*(H*scale+padding)+padding, cols*(W*scale+padding)+padding(, C)] from images
    [N, C, H, W] in [-1, 1] (C = 1 or 3), N = rows * cols, row-major, each enlarged `scale` times and
    framed by `padding` pixels of grey `padding_value` (visible between dark-background images)."""
    count, channels, height, width = images.shape
    if count % rows:
        raise UserError(f"{count} images do not fill {rows} rows")
    if channels not in (1, 3):
        raise UserError(f"images must have 1 or 3 channels, got {channels}")
    cols = count // rows
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    cell_h, cell_w = height * scale + padding, width * scale + padding
    canvas = torch.full((channels, rows * cell_h + padding, cols * cell_w + padding), padding_value, dtype=torch.uint8)
    for index in range(count):
        top, left = (index // cols) * cell_h + padding, (index % cols) * cell_w + padding
        canvas[:, top : top + height * scale, left : left + width * scale] = pixels[index]
    array = canvas.permute(1, 2, 0).numpy()
    return array[..., 0] if channels == 1 else array


def write_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 [H, W] or [H, W, 3] image, beside the target first and then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    Image.fromarray(array).save(staging, format="PNG")
    os.replace(staging, path)


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
    unet, scheduler, sampler = load_model(model_cfg)
    start = time.perf_counter()
    images = sample(unet, scheduler.config, sampler, args.rows * args.cols, seed=args.seed, batch_size=args.batch_size)
    elapsed = time.perf_counter() - start
    write_png(image_grid(images, args.rows, args.scale), args.out)
    print(f"{args.rows * args.cols} samples ({sampler.name}, {sampler.num_steps} steps, eta {sampler.eta}, "
          f"{sampler.spacing} spacing, seed {args.seed}) in {elapsed:.1f} s on {torch.get_num_threads()} "
          f"threads -> {args.out}")


if __name__ == "__main__":
    main()
