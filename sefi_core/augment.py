"""Training-image augmentation (paper §6.4): colour jitter, horizontal flip (p=0.5), and random scaling of
the subject to 0.1-1.0 of the canvas at a random position. The loss is taken where the subject is."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_RANGE = (0.1, 1.0)
JITTER = 0.1  # brightness, contrast and saturation factors drawn from [1-JITTER, 1+JITTER]


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


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def color_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    b, c, s = (_uniform(generator, 1 - JITTER, 1 + JITTER) for _ in range(3))
    image = image * b
    mean = image.mean()
    image = (image - mean) * c + mean
    grey = image.mean(0, keepdim=True)
    return ((image - grey) * s + grey).clamp(0, 1)


def augment(square: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, R, R) -> augmented (3, R, R) and the subject's mask (R, R) on the canvas."""
    size = square.shape[-1]
    image = color_jitter(square, generator)
    if float(torch.rand((), generator=generator)) < 0.5:
        image = image.flip(-1)
    side = max(8, round(size * _uniform(generator, *SCALE_RANGE)))
    small = F.interpolate(image.unsqueeze(0), size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    top = int(torch.randint(0, size - side + 1, (), generator=generator))
    left = int(torch.randint(0, size - side + 1, (), generator=generator))
    canvas = image.mean((1, 2), keepdim=True).expand(3, size, size).clone()
    canvas[:, top:top + side, left:left + side] = small
    mask = torch.zeros(size, size)
    mask[top:top + side, left:left + side] = 1
    return canvas, mask
