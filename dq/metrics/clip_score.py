"""CLIP score of text-to-image samples against their prompts (docs/method.md §6: ViT-L/14 for MS-COCO).

torchmetrics' CLIPScore (100 * max(cos(image embedding, text embedding), 0), averaged) with the CLIP model
loaded from a local folder in transformers' layout, offline: no hub download happens during evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dq.errors import UserError
from dq.metrics.backends import BackendUnavailable
from dq.metrics.images import check_images


def clip_score(images: torch.Tensor, prompts: list[str], model_path: str | os.PathLike, batch_size: int = 32,
               device: str | torch.device = "cpu") -> float:
    """Mean CLIP score of uint8 images [N, C, H, W] (C = 1 is repeated to RGB) with prompts[k] for image k."""
    check_images(images)
    if len(prompts) != len(images):
        raise UserError(f"CLIP score needs one prompt per image, got {len(prompts)} prompts for {len(images)} images")
    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"CLIP model folder {path} has no config.json: save one with CLIPModel.save_pretrained "
                         "(e.g. openai/clip-vit-large-patch14, the paper's ViT-L/14) and set eval.clip_model to it")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        metric = CLIPScore(model_name_or_path=str(path), sync_on_compute=False).to(device)
    except ModuleNotFoundError as err:
        raise BackendUnavailable(f"the CLIP score needs transformers: pip install 'transformers>=4.10' ({err})") from err
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    for first in range(0, len(images), batch_size):
        metric.update(images[first : first + batch_size].to(device), prompts[first : first + batch_size])
    return float(metric.compute())
