"""Training-image augmentation (paper §6.4): colour jitter, horizontal flip (p=0.5), and random scaling of
the subject to 0.1-1.0 of the canvas at a random position. The loss is taken where the subject is: the scaled photo,
and within it the subject mask when the artist gives one."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_RANGE = (0.1, 1.0)
JITTER = 0.1  # brightness, contrast and saturation factors drawn from [1-JITTER, 1+JITTER]
EMPTY_SUBJECT_MASK = ("The subject mask is empty: paint over the subject (the face, the pet) in Load Image's mask "
                      "editor, or disconnect the mask to train on the centre square.")
SUBJECT_MARGIN = 0.25  # the square around a subject mask: its box's longer side plus this much (hair, chin, ears)


def subject_square(image: torch.Tensor, subject: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) photo and its subject mask (H, W) in 0-1 -> the (3, size, size) square and the mask on it.

    The square holds the mask's bounding box whole, plus a margin, centred on it; where the photo ends first, it is
    shifted inside (the box stays whole) rather than padded, and only a box larger than the photo's short side is
    padded with the photo's mean colour."""
    rows, cols = torch.nonzero(subject > 0.5, as_tuple=True)
    if len(rows) == 0:
        raise ValueError(EMPTY_SUBJECT_MASK)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    side = max(8, round(max(bottom - top, right - left) * (1 + SUBJECT_MARGIN)))
    _, height, width = image.shape
    y0, x0 = round((top + bottom - side) / 2), round((left + right - side) / 2)
    if side <= height:
        y0 = min(max(y0, 0), height - side)
    if side <= width:
        x0 = min(max(x0, 0), width - side)
    crop = _padded_crop(image, y0, x0, side, image.mean((1, 2)))
    mask = _padded_crop(subject[None].float(), y0, x0, side, torch.zeros(1))
    resize = dict(size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (F.interpolate(crop[None], **resize)[0].clamp(0, 1), F.interpolate(mask[None], **resize)[0, 0].clamp(0, 1))


def _padded_crop(image: torch.Tensor, top: int, left: int, side: int, fill: torch.Tensor) -> torch.Tensor:
    """The (C, side, side) window of `image` at (top, left); outside the image, `fill` (C,)."""
    channels, height, width = image.shape
    out = fill.to(image).view(channels, 1, 1).expand(channels, side, side).clone()
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, height), min(left + side, width)
    out[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]
    return out


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def color_jitter(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    b, c, s = (_uniform(generator, 1 - JITTER, 1 + JITTER) for _ in range(3))
    image = image * b
    mean = image.mean()
    image = (image - mean) * c + mean
    grey = image.mean(0, keepdim=True)
    return ((image - grey) * s + grey).clamp(0, 1)


def augment(square: torch.Tensor, generator: torch.Generator,
            subject: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, R, R) -> augmented (3, R, R) and where to take the loss (R, R): the scaled photo on the canvas, times the
    subject mask (R, R, flipped and scaled with the photo) when one is given."""
    size = square.shape[-1]
    image = color_jitter(square, generator)
    layers = image if subject is None else torch.cat([image, subject[None].to(image)])
    if float(torch.rand((), generator=generator)) < 0.5:
        layers = layers.flip(-1)
    side = max(8, round(size * _uniform(generator, *SCALE_RANGE)))
    small = F.interpolate(layers.unsqueeze(0), size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    top = int(torch.randint(0, size - side + 1, (), generator=generator))
    left = int(torch.randint(0, size - side + 1, (), generator=generator))
    canvas = layers[:3].mean((1, 2), keepdim=True).expand(3, size, size).clone()
    canvas[:, top:top + side, left:left + side] = small[:3]
    mask = torch.zeros(size, size)
    mask[top:top + side, left:left + side] = 1 if subject is None else small[3].clamp(0, 1)
    return canvas, mask
