"""Pictures written to files: PNG grids and GIFs, for the command line and the metrics. (Notebooks show
pictures inline, with diffusion_utilities.show_images and animation_html.)"""
from __future__ import annotations

from pathlib import Path

import torch

from diffusion_utilities import image_grid


def save_grid_png(x, path, nrow=8, scale=4):
    """Write a batch (B, 3, H, W) in [-1, 1] as a PNG grid, each pixel a crisp scale x scale block."""
    from torchvision.utils import save_image

    grid = torch.from_numpy(image_grid(x, nrow)).permute(2, 0, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2), path)  # nearest: pixel art stays sharp
    return path


def save_gif(ani, path, fps=5):
    """Save an animation as a GIF with Pillow. Returns the path."""
    from matplotlib.animation import PillowWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ani.save(path, writer=PillowWriter(fps=fps), dpi=100)
    return path
