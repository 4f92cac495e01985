"""Photos as both trainings read them: an IMAGE's (H, W, C) tensor as RGB, and its centre square."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """(H, W, C) in 0-1 with C in {1, 3, 4} -> (3, H, W); alpha is dropped, grey repeated."""
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (height, width, 1|3|4 channels); got {tuple(image.shape)}")
    image = image[..., :3] if image.shape[-1] >= 3 else image.expand(-1, -1, 3)
    return image.permute(2, 0, 1).float().clamp(0, 1)


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): crop the central square, resize."""
    _, h, w = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[:, top:top + side, left:left + side].unsqueeze(0)
    return F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
