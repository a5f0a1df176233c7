from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dq.sampling.grid import image_grid
from dq.zoo.sample_grid import main

LOCAL_CONFIG = str(Path(__file__).resolve().parents[2] / "conf" / "model" / "local.yaml")


def test_image_grid_layout():
    images = torch.full((6, 1, 2, 2), -1.0)
    images[4] = 1.0  # row 1, column 1
    grid = image_grid(images, rows=2, scale=2, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1) and grid.dtype == np.uint8
    assert (grid[6:10, 6:10] == 255).all() and grid[1:5, 1:5].max() == 0
    assert image_grid(torch.zeros(4, 3, 2, 2), rows=2).shape == (7, 7, 3)
    with pytest.raises(ValueError, match="do not fill"):
        image_grid(images, rows=4)


def test_grid_command_on_a_local_model(tmp_path, tiny_unet, ddpm_scheduler):
    tiny_unet.save_pretrained(tmp_path / "model" / "unet")
    ddpm_scheduler.save_pretrained(tmp_path / "model" / "scheduler")
    out = tmp_path / "grid.png"
    main(["--out", str(out), "--model-config", LOCAL_CONFIG, "--path", str(tmp_path / "model"),
          "--rows", "2", "--cols", "3", "--scale", "1"])
    with Image.open(out) as image:
        assert image.size == (3 * 9 + 1, 2 * 9 + 1) and image.mode == "L"
