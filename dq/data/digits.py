"""The real handwritten digits that scikit-learn ships (1,797 images, 8x8, 17 grey levels).

They are the training set of dq's embedded model and the reference set of its domain FID, so the one
preprocessing function below is shared by both: changing it changes what the model was trained on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dq.errors import UserError

DIGITS_SIZE = 16  # side of the embedded model's images, in pixels


def load_digit_images(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N, 1, size, size] float32 in [-1, 1], labels [N] int64), N = 1,797.

    The 8x8 originals (values 0..16) are upsampled bilinearly (align_corners=False) to `size`.
    Needs scikit-learn (requirements-dev.txt); it is imported here only, so the runtime does not need it.
    """
    if size < 8 or size % 8:
        raise UserError(f"size must be a multiple of 8 and >= 8, got {size}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # the runtime stack does not ship scikit-learn on purpose
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install -r requirements-dev.txt"
        ) from err
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N,1,8,8] in [0,1]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, 1.0) * 2.0 - 1.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images.contiguous(), labels
