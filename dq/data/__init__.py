"""Datasets shipped by packages (no download): the real images dq's embedded model is trained on."""

from dq.data.digits import DIGITS_SIZE, load_digit_images

__all__ = ["DIGITS_SIZE", "load_digit_images"]
