"""The pixels every metric sees: uint8 images [N, C, H, W], as PNG files store them, and image folders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dq.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def check_images(images: torch.Tensor) -> None:
    """ValueError unless images is uint8 [N, C, H, W] with C = 1 (grey) or 3 (RGB)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"images must be uint8 [N, C, H, W] with C = 1 or 3, got {images.dtype} {tuple(images.shape)}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] pixels of images [N, C, H, W] in [-1, 1]: round((x + 1) * 127.5), as PNGs store them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_files(folder: str | Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"reference image folder {folder} does not exist or is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return files


def read_images(files: list[Path]) -> torch.Tensor:
    """uint8 [N, C, H, W] from image files of one size: C = 1 when every file is greyscale, else 3 (RGB)."""
    opened = [Image.open(path) for path in files]
    grey = all(image.mode in ("L", "1", "I;16", "I") for image in opened)
    arrays = [np.asarray(image.convert("L" if grey else "RGB")) for image in opened]
    sizes = {array.shape[:2] for array in arrays}
    if len(sizes) > 1:
        raise UserError(f"images of different sizes {sorted(sizes)[:4]}: resize the reference set to one size first")
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if grey else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def iter_image_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    for first in range(0, len(files), batch_size):
        yield read_images(files[first : first + batch_size])
