"""Image grids: `image_grid` lays samples out as one picture, `write_png` writes it whole (renamed into place).
The command-line grid of a model's samples is `python -m dq.zoo.sample_grid`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dq.errors import UserError
from dq.io import atomic_write


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
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
